// GroupNorm -> per-(image, channel) affine -> optional SiLU, forward and backward, as XLA FFI
// custom calls for the CPU (see `synth_med.ops.xla.group_norm_act` for the maths; this is
// the same computation, image by image, so each image's activations stay in cache between
// the passes). Channels must be a multiple of the SIMD width VL.
//
// forward(x [B,H,W,C], a [B,C], b [B,C]) -> y, mean [B,C], inv [B,C]
//   mean, inv: each channel's group mean and 1/sqrt(var + 1e-5), var = E[x^2] - E[x]^2;
//   y = act((x - mean) * inv * a + b).
// backward(x, a, b, mean, inv, dy) -> dx, da [B,C], db [B,C]
//   dz = dy * act'(z); db = sum_px dz; da = sum_px dz * xhat;
//   dx = inv * (dz * a - mean_g(a * db) - xhat * mean_g(a * da)).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "scratch.h"
#include "simd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace synth_med;

namespace {

// Per-channel -> per-group mean over n values, written back per channel.
void group_mean(const float* per_channel, float* out, int64_t C, int64_t groups, double n) {
  const int64_t cg = C / groups;
  for (int64_t g = 0; g < groups; ++g) {
    double s = 0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) s += per_channel[c];
    const float m = float(s / n);
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) out[c] = m;
  }
}

// The passes that sum over an image's pixels run pixel by pixel over a block of KB channel
// vectors at once (pixels outer), so they read the image in order: one vector at a time
// down the pixels (channel vectors outer) reads C / VL strided streams, ~2x slower on an
// image that is not yet in cache. Each channel still sums its pixels in order 0..P-1, so the
// sums are the same to the bit.
template <int KB>
void channel_sums(const float* x, int64_t P, int64_t C, int64_t c0, float* s1, float* s2) {
  vf a1[KB] = {}, a2[KB] = {};
  for (int64_t p = 0; p < P; ++p) {
    const float* row = x + p * C + c0;
    for (int k = 0; k < KB; ++k) {
      const vf v = load(row + k * VL);
      a1[k] += v;
      a2[k] += v * v;
    }
  }
  for (int k = 0; k < KB; ++k) {
    store(s1 + c0 + k * VL, a1[k]);
    store(s2 + c0 + k * VL, a2[k]);
  }
}

// Backward's first pass over channels [c0, c0 + KB VL): dz = dy * act'(z) stored, and its sums
// db = sum dz, da = sum dz * xhat.
template <int KB>
void dz_sums(const float* x, const float* dy, int64_t P, int64_t C, int64_t c0, const float* mean, const float* inv,
             const float* a, const float* b, bool silu, float* dz, float* db, float* da) {
  vf vm[KB], vinv[KB], va[KB], vb[KB], sdz[KB] = {}, sdzx[KB] = {};
  for (int k = 0; k < KB; ++k) {
    const int64_t c = c0 + k * VL;
    vm[k] = load(mean + c), vinv[k] = load(inv + c), va[k] = load(a + c), vb[k] = load(b + c);
  }
  for (int64_t p = 0; p < P; ++p) {
    for (int k = 0; k < KB; ++k) {
      const int64_t o = p * C + c0 + k * VL;
      const vf xh = (load(x + o) - vm[k]) * vinv[k];
      vf g = load(dy + o);
      if (silu) {
        const vf z = xh * va[k] + vb[k];
        const vf s = vsigmoid(z);
        g = g * s * (splat(1.0f) + z * (splat(1.0f) - s));
      }
      store(dz + o, g);
      sdz[k] += g;
      sdzx[k] += g * xh;
    }
  }
  for (int k = 0; k < KB; ++k) {
    store(db + c0 + k * VL, sdz[k]);
    store(da + c0 + k * VL, sdzx[k]);
  }
}

// Calls f(std::integral_constant<int, KB>, c0) over the C / VL channel vectors in blocks of
// KB <= MaxKB vectors (MaxKB a power of two).
template <int MaxKB, typename F>
void over_channel_blocks(int64_t C, F f) {
  int64_t c0 = 0;
  for (; c0 + MaxKB * VL <= C; c0 += MaxKB * VL) f(std::integral_constant<int, MaxKB>{}, c0);
  if (MaxKB > 4 && c0 + 4 * VL <= C) f(std::integral_constant<int, 4>{}, c0), c0 += 4 * VL;
  if (MaxKB > 2 && c0 + 2 * VL <= C) f(std::integral_constant<int, 2>{}, c0), c0 += 2 * VL;
  if (MaxKB > 1 && c0 + VL <= C) f(std::integral_constant<int, 1>{}, c0);
}

ffi::Error check(const ffi::Buffer<ffi::F32>& x, int64_t groups) {
  auto d = x.dimensions();
  if (d.size() != 4) return ffi::Error(ffi::ErrorCode::kInvalidArgument, "group_norm_act: x must be NHWC");
  if (d[3] % VL != 0 || groups <= 0 || d[3] % groups != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "group_norm_act: channels must be a multiple of the SIMD width and of groups");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> ab, ffi::Buffer<ffi::F32> bb,
                   ffi::ResultBuffer<ffi::F32> yb, ffi::ResultBuffer<ffi::F32> meanb,
                   ffi::ResultBuffer<ffi::F32> invb, int64_t groups, bool silu) {
  if (auto e = check(xb, groups); e.failure()) return e;
  auto d = xb.dimensions();
  const int64_t B = d[0], P = d[1] * d[2], C = d[3];
  const float* X = xb.typed_data();
  const float *A = ab.typed_data(), *Bv = bb.typed_data();
  float *Y = yb->typed_data(), *M = meanb->typed_data(), *I = invb->typed_data();
  std::vector<float> s1(C), s2(C), m2(C), scale(C), offset(C);
  const double n = double(P) * double(C / groups);
  for (int64_t i = 0; i < B; ++i) {
    const float* x = X + i * P * C;
    float* y = Y + i * P * C;
    over_channel_blocks<8>(C, [&](auto kb, int64_t c0) { channel_sums<kb.value>(x, P, C, c0, s1.data(), s2.data()); });
    float* mean = M + i * C;
    float* inv = I + i * C;
    group_mean(s1.data(), mean, C, groups, n);
    group_mean(s2.data(), m2.data(), C, groups, n);
    for (int64_t c = 0; c < C; ++c) {
      inv[c] = 1.0f / std::sqrt(std::max(m2[c] - mean[c] * mean[c], 0.0f) + 1e-5f);
      scale[c] = inv[c] * A[i * C + c];
      offset[c] = Bv[i * C + c] - mean[c] * scale[c];
    }
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t c = 0; c < C; c += VL) {
        const vf z = load(x + p * C + c) * load(&scale[c]) + load(&offset[c]);
        store(y + p * C + c, silu ? z * vsigmoid(z) : z);
      }
    }
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> xb, ffi::Buffer<ffi::F32> ab, ffi::Buffer<ffi::F32> bb,
                    ffi::Buffer<ffi::F32> meanb, ffi::Buffer<ffi::F32> invb, ffi::Buffer<ffi::F32> dyb,
                    ffi::ResultBuffer<ffi::F32> dxb, ffi::ResultBuffer<ffi::F32> dab,
                    ffi::ResultBuffer<ffi::F32> dbb, int64_t groups, bool silu) {
  if (auto e = check(xb, groups); e.failure()) return e;
  auto d = xb.dimensions();
  const int64_t B = d[0], P = d[1] * d[2], C = d[3];
  const float *X = xb.typed_data(), *A = ab.typed_data(), *Bv = bb.typed_data();
  const float *M = meanb.typed_data(), *I = invb.typed_data(), *DY = dyb.typed_data();
  float *DX = dxb->typed_data(), *DA = dab->typed_data(), *DB = dbb->typed_data();
  float* dz = scratch(0, P * C);
  if (!dz) return out_of_memory();
  std::vector<float> m1(C), m2(C), tmp(C);
  const double n = double(P) * double(C / groups);
  for (int64_t i = 0; i < B; ++i) {
    const float* x = X + i * P * C;
    const float* dy = DY + i * P * C;
    float* dx = DX + i * P * C;
    const float *a = A + i * C, *b = Bv + i * C, *mean = M + i * C, *inv = I + i * C;
    float *da = DA + i * C, *db = DB + i * C;
    over_channel_blocks<4>(C, [&](auto kb, int64_t c0) {  // 6 live vectors a block
      dz_sums<kb.value>(x, dy, P, C, c0, mean, inv, a, b, silu, dz, db, da);
    });
    for (int64_t c = 0; c < C; ++c) tmp[c] = a[c] * db[c];
    group_mean(tmp.data(), m1.data(), C, groups, n);
    for (int64_t c = 0; c < C; ++c) tmp[c] = a[c] * da[c];
    group_mean(tmp.data(), m2.data(), C, groups, n);
    for (int64_t p = 0; p < P; ++p) {
      for (int64_t c = 0; c < C; c += VL) {
        const vf vinv = load(inv + c);
        const vf xh = (load(x + p * C + c) - load(mean + c)) * vinv;
        store(dx + p * C + c, vinv * (load(dz + p * C + c) * load(a + c) - load(&m1[c]) - xh * load(&m2[c])));
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedGroupNormActFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("silu"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedGroupNormActBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("silu"));
