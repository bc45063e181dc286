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
//
// The attribute `products` picks their precision (the model's matmul_precision):
//   0  float32;
//   1  bfloat16 products, float32 sums, on the float32 kernel: the caller passes q, k, v and
//      dout already rounded to bfloat16, and P and dS are rounded here before their products;
//   2  the same maths on AMX tiles (amx_gemm rounds every operand as it packs it); the caller
//      passes float32 operands.
// The softmax, the log-sum-exp and dS's row sums use float32 P in every mode.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "amx_gemm.h"
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

ffi::Error dims_of(const ffi::Buffer<ffi::F32>& qkv, int64_t mode, Dims* out) {
  if (mode < 0 || mode > 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "attention: products must be 0 (float32), 1 or 2 (bfloat16)");
  auto s = qkv.dimensions();
  if (s.size() != 5 || s[2] != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "attention: qkv must be [B, N, 3, H, d]");
  *out = {s[0], s[1], s[3], s[4]};
  if (out->N % VL || out->d % VL)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "attention: tokens and head channels must be multiples of the SIMD width");
  return ffi::Error::Success();
}

enum Products : int64_t { kFloat32 = 0, kRoundedBf16 = 1, kAmxBf16 = 2 };

// The bfloat16 rounding of n values, in place (to nearest, ties to even), for mode 1.
void round_bf16(float* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, p + i, 4);
    if ((u & 0x7fffffffu) <= 0x7f800000u) u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    std::memcpy(p + i, &u, 4);
  }
}

// Every product below returns false only in mode 2, when amx_gemm cannot run (no AMX tiles,
// tokens or head channels not multiples of 16, no scratch): the kernel then fails with
// `no_amx()` rather than compute float32 products of unrounded operands.
ffi::Error no_amx() {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "attention: bfloat16 products on AMX tiles cannot run here (no AMX, or tokens and head "
                    "channels not multiples of 16); synth_med picks this mode only where they can");
}

// c (row stride c_rs) = A B, M x Nc over K, A[m][k] = a[m * a_rs + k * a_ks] and B[k][n] =
// b[k * b_ks + n]: on AMX tiles in mode 2, else the float32 kernel.
bool product(int64_t mode, int64_t M, int64_t Nc, int64_t K, const float* a, int64_t a_rs, int64_t a_ks,
             const float* b, int64_t b_ks, float* c, int64_t c_rs) {
  if (mode == kAmxBf16) return amx_gemm(M, Nc, K, a, a_rs, a_ks, b, b_ks, 1, c, c_rs);
  gemm(M, Nc, K, a, a_rs, a_ks, b, b_ks, c, c_rs);
  return true;
}

// c = x y^T (x: M x d, row stride x_rs; y: Nc x d, row stride y_rs): on AMX tiles in mode 2,
// else the float32 kernel after transposing y into t (d x Nc scratch).
bool product_nt(int64_t mode, int64_t M, int64_t Nc, int64_t d, const float* x, int64_t x_rs, const float* y,
                int64_t y_rs, float* t, float* c, int64_t c_rs) {
  if (mode == kAmxBf16) return amx_gemm(M, Nc, d, x, x_rs, 1, y, 1, y_rs, c, c_rs);
  transpose(y, Nc, d, y_rs, t);
  gemm(M, Nc, d, x, x_rs, 1, t, Nc, c, c_rs);
  return true;
}

// c[n * c_rs + m] = (A B)[m][n]: dv = P^T dout and dk = dS^T q as (dout^T P)^T and (q^T dS)^T,
// A = x^T (x: N x d, row stride x_rs) and B = y (N x N); on AMX tiles in mode 2, else the
// float32 kernel on y^T x.
bool transposed_product(int64_t mode, int64_t N, int64_t d, const float* x, int64_t x_rs, const float* y,
                        float* c, int64_t c_rs) {
  if (mode == kAmxBf16) return amx_gemm(d, N, N, x, 1, x_rs, y, N, 1, c, c_rs, true);
  gemm(N, d, N, y, 1, N, x, x_rs, c, c_rs);
  return true;
}

ffi::Error Forward(ffi::Buffer<ffi::F32> qkvb, ffi::ResultBuffer<ffi::F32> outb, ffi::ResultBuffer<ffi::F32> lseb,
                   int64_t mode) {
  Dims D;
  if (auto e = dims_of(qkvb, mode, &D); e.failure()) return e;
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
      if (!product_nt(mode, N, N, d, q, ls, k, ls, kt, S, N)) return no_amx();  // S = q k^T, unscaled
      const vf vs = splat(scale);
      for (int64_t i = 0; i < N; ++i) {
        float* row = S + i * N;
        vf mx = load(row);
        for (int64_t j = VL; j < N; j += VL) { const vf x = load(row + j); mx = x > mx ? x : mx; }
        const float m = hmax(mx) * scale;  // the scaled row's maximum (scale > 0)
        vf sum = {};
        for (int64_t j = 0; j < N; j += VL) {
          const vf e = vexp(load(row + j) * vs - splat(m));
          store(row + j, e);
          sum += e;
        }
        const float s = hsum(sum);
        const vf inv = splat(1.0f / s);
        for (int64_t j = 0; j < N; j += VL) store(row + j, load(row + j) * inv);
        lse[i] = m + std::log(s);
      }
      if (mode == kRoundedBf16) round_bf16(S, N * N);
      if (!product(mode, N, d, N, S, N, 1, v, ls, out, lo)) return no_amx();
    }
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> qkvb, ffi::Buffer<ffi::F32> lseb, ffi::Buffer<ffi::F32> doutb,
                    ffi::ResultBuffer<ffi::F32> dqkvb, int64_t mode) {
  Dims D;
  if (auto e = dims_of(qkvb, mode, &D); e.failure()) return e;
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
      if (!product_nt(mode, N, N, d, q, ls, k, ls, t, P, N)) return no_amx();  // S = q k^T, unscaled
      const vf vs = splat(scale);
      for (int64_t i = 0; i < N; ++i) {
        float* row = P + i * N;
        const vf l = splat(lse[i]);
        for (int64_t j = 0; j < N; j += VL) store(row + j, vexp(load(row + j) * vs - l));
      }
      if (!product_nt(mode, N, N, d, dout, lo, v, ls, t, dP, N)) return no_amx();  // dP = dout v^T
      for (int64_t i = 0; i < N; ++i) {
        const float* p = P + i * N;
        float* g = dP + i * N;
        vf acc = {};
        for (int64_t j = 0; j < N; j += VL) acc += load(p + j) * load(g + j);
        const vf D_i = splat(hsum(acc)), vs = splat(scale);
        for (int64_t j = 0; j < N; j += VL) store(g + j, vs * load(p + j) * (load(g + j) - D_i));
      }
      if (mode == kRoundedBf16) {
        round_bf16(P, N * N);
        round_bf16(dP, N * N);
      }
      if (!transposed_product(mode, N, d, dout, lo, P, dv, ls) ||  // dv = P^T dout
          !product(mode, N, d, N, dP, N, 1, k, ls, dq, ls) ||      // dq = dS k
          !transposed_product(mode, N, d, q, ls, dP, dk, ls))      // dk = dS^T q
        return no_amx();
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("products"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("products"));
