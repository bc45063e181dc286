// Multi-head self-attention, forward and backward, as XLA FFI custom calls for the CPU.
//
// forward(qkv [B, N, 3, H, d]) -> out [B, N, H, d], lse [B, H, N]
//   out = softmax(q k^T / sqrt(d)) v per (image, head); lse is each row's log-sum-exp.
// backward(qkv, lse, dout) -> dqkv [B, N, 3, H, d]
//   P is recomputed from q, k and lse; dv = P^T dout; dP = dout v^T;
//   dS = P * (dP - rowsum(P * dP)) / sqrt(d); dq = dS k; dk = dS^T q.
//
// Each (image, head) works on one N x N score matrix in cache; the six products are one
// register-tiled kernel (an outer product per step of the sum, as in conv_kernel_grad.cc)
// reading q, k, v, dout and writing out, dqkv in place in their packed layouts, so none of
// XLA's transposes and slices of qkv are needed. N and d must be multiples of VL.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "outer_product.h"
#include "scratch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace synth_med;

namespace {

float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < VL; ++i) m = std::max(m, v[i]);
  return m;
}

float hsum(vf v) {
  float s = 0;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

struct Dims { int64_t B, N, H, d; };

ffi::Error dims_of(const ffi::Buffer<ffi::F32>& qkv, Dims* out) {
  auto s = qkv.dimensions();
  if (s.size() != 5 || s[2] != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "attention: qkv must be [B, N, 3, H, d]");
  *out = {s[0], s[1], s[3], s[4]};
  if (out->N % VL || out->d % VL)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "attention: tokens and head channels must be multiples of the SIMD width");
  return ffi::Error::Success();
}

// S = scale * q k^T for one (image, head); kt is d x N scratch.
void scores(const float* q, const float* k, const Dims& D, int64_t ls, float scale, float* kt, float* S) {
  transpose(k, D.N, D.d, ls, kt);
  gemm(D.N, D.N, D.d, q, ls, 1, kt, D.N, S, D.N);
  const vf vs = splat(scale);
  for (int64_t i = 0; i < D.N * D.N; i += VL) store(S + i, load(S + i) * vs);
}

ffi::Error Forward(ffi::Buffer<ffi::F32> qkvb, ffi::ResultBuffer<ffi::F32> outb, ffi::ResultBuffer<ffi::F32> lseb) {
  Dims D;
  if (auto e = dims_of(qkvb, &D); e.failure()) return e;
  const int64_t N = D.N, d = D.d, H = D.H, ls = 3 * H * d, lo = H * d;
  const float scale = 1.0f / std::sqrt(float(d));
  float* S = scratch(0, N * N);
  float* kt = scratch(1, d * N);
  if (!S || !kt) return out_of_memory();
  for (int64_t b = 0; b < D.B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const float* q = qkvb.typed_data() + b * N * ls + h * d;
      const float* k = q + H * d;
      const float* v = q + 2 * H * d;
      float* out = outb->typed_data() + b * N * lo + h * d;
      float* lse = lseb->typed_data() + (b * H + h) * N;
      scores(q, k, D, ls, scale, kt, S);
      for (int64_t i = 0; i < N; ++i) {
        float* row = S + i * N;
        vf mx = load(row);
        for (int64_t j = VL; j < N; j += VL) { const vf x = load(row + j); mx = x > mx ? x : mx; }
        const float m = hmax(mx);
        vf sum = {};
        for (int64_t j = 0; j < N; j += VL) {
          const vf e = vexp(load(row + j) - splat(m));
          store(row + j, e);
          sum += e;
        }
        const float s = hsum(sum);
        const vf inv = splat(1.0f / s);
        for (int64_t j = 0; j < N; j += VL) store(row + j, load(row + j) * inv);
        lse[i] = m + std::log(s);
      }
      gemm(N, d, N, S, N, 1, v, ls, out, lo);
    }
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> qkvb, ffi::Buffer<ffi::F32> lseb, ffi::Buffer<ffi::F32> doutb,
                    ffi::ResultBuffer<ffi::F32> dqkvb) {
  Dims D;
  if (auto e = dims_of(qkvb, &D); e.failure()) return e;
  const int64_t N = D.N, d = D.d, H = D.H, ls = 3 * H * d, lo = H * d;
  const float scale = 1.0f / std::sqrt(float(d));
  float* P = scratch(0, N * N);
  float* dP = scratch(2, N * N);
  float* t = scratch(1, d * N);
  if (!P || !dP || !t) return out_of_memory();
  for (int64_t b = 0; b < D.B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const float* q = qkvb.typed_data() + b * N * ls + h * d;
      const float* k = q + H * d;
      const float* v = q + 2 * H * d;
      const float* lse = lseb.typed_data() + (b * H + h) * N;
      const float* dout = doutb.typed_data() + b * N * lo + h * d;
      float* dq = dqkvb->typed_data() + b * N * ls + h * d;
      float* dk = dq + H * d;
      float* dv = dq + 2 * H * d;
      scores(q, k, D, ls, scale, t, P);
      for (int64_t i = 0; i < N; ++i) {
        float* row = P + i * N;
        const vf l = splat(lse[i]);
        for (int64_t j = 0; j < N; j += VL) store(row + j, vexp(load(row + j) - l));
      }
      gemm(N, d, N, P, 1, N, dout, lo, dv, ls);           // dv = P^T dout
      transpose(v, N, d, ls, t);
      gemm(N, N, d, dout, lo, 1, t, N, dP, N);      // dP = dout v^T
      for (int64_t i = 0; i < N; ++i) {
        const float* p = P + i * N;
        float* g = dP + i * N;
        vf acc = {};
        for (int64_t j = 0; j < N; j += VL) acc += load(p + j) * load(g + j);
        const vf D_i = splat(hsum(acc)), vs = splat(scale);
        for (int64_t j = 0; j < N; j += VL) store(g + j, vs * load(p + j) * (load(g + j) - D_i));
      }
      gemm(N, d, N, dP, N, 1, k, ls, dq, ls);              // dq = dS k
      gemm(N, d, N, dP, 1, N, q, ls, dk, ls);              // dk = dS^T q
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
