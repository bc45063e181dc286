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
#include <vector>

#include "outer_product.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace synth_med;

namespace {

// C [M x Nc] = A [M x K] B [K x Nc], A read through strides, Nc a multiple of VL.
void gemm(int64_t M, int64_t Nc, int64_t K, const float* a, int64_t a_rs, int64_t a_ks,
          const float* b, int64_t b_ks, float* c, int64_t c_rs) {
  const Segment run{a, b, K};
#if defined(__AVX512F__)
  // Four vectors wide where the columns allow: 6 x 4 accumulators load fewer broadcasts per FMA.
  if (Nc % (4 * VL) == 0 && M >= 6) {
    const int64_t m6 = M / 6 * 6;
    for (int64_t m = 0; m < m6; m += 6)
      for (int64_t n = 0; n < Nc; n += 4 * VL)
        tile<6, 4, false>(&run, 1, m * a_rs, n, a_rs, a_ks, b_ks, c + m * c_rs + n, c_rs);
    if (M > m6) gemm(M - m6, Nc, K, a + m6 * a_rs, a_rs, a_ks, b, b_ks, c + m6 * c_rs, c_rs);
    return;
  }
#endif
  tiled_product<false>(M, Nc, &run, 1, a_rs, a_ks, b_ks, c, c_rs);
}

void transpose(const float* src, int64_t rows, int64_t cols, int64_t src_rs, float* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t t = 0; t < cols; ++t) dst[t * rows + i] = src[i * src_rs + t];
}

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
  std::vector<float> S(N * N), kt(d * N);
  for (int64_t b = 0; b < D.B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const float* q = qkvb.typed_data() + b * N * ls + h * d;
      const float* k = q + H * d;
      const float* v = q + 2 * H * d;
      float* out = outb->typed_data() + b * N * lo + h * d;
      float* lse = lseb->typed_data() + (b * H + h) * N;
      scores(q, k, D, ls, scale, kt.data(), S.data());
      for (int64_t i = 0; i < N; ++i) {
        float* row = S.data() + i * N;
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
      gemm(N, d, N, S.data(), N, 1, v, ls, out, lo);
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
  std::vector<float> P(N * N), dP(N * N), t(d * N);
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
      scores(q, k, D, ls, scale, t.data(), P.data());
      for (int64_t i = 0; i < N; ++i) {
        float* row = P.data() + i * N;
        const vf l = splat(lse[i]);
        for (int64_t j = 0; j < N; j += VL) store(row + j, vexp(load(row + j) - l));
      }
      gemm(N, d, N, P.data(), 1, N, dout, lo, dv, ls);           // dv = P^T dout
      transpose(v, N, d, ls, t.data());
      gemm(N, N, d, dout, lo, 1, t.data(), N, dP.data(), N);      // dP = dout v^T
      for (int64_t i = 0; i < N; ++i) {
        const float* p = P.data() + i * N;
        float* g = dP.data() + i * N;
        vf acc = {};
        for (int64_t j = 0; j < N; j += VL) acc += load(p + j) * load(g + j);
        const vf D_i = splat(hsum(acc)), vs = splat(scale);
        for (int64_t j = 0; j < N; j += VL) store(g + j, vs * load(p + j) * (load(g + j) - D_i));
      }
      gemm(N, d, N, dP.data(), N, 1, k, ls, dq, ls);              // dq = dS k
      gemm(N, d, N, dP.data(), 1, N, q, ls, dk, ls);              // dk = dS^T q
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
