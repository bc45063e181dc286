// SIMD vectors as GCC/Clang vector extensions: AVX-512 where the build machine has it
// (-march=native), else 8 floats (AVX2, or two NEON registers on ARM).
#pragma once
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace synth_med {

#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

static inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline vf splat(float s) { return vf{} + s; }

// e^(x - n ln 2) for x - n ln 2 within ln(2)/2: the reduction in two steps (Cody-Waite) and
// Cephes' expf polynomial.
static inline vf exp_reduced(vf x, vf nf) {
  vf r = x - nf * splat(0.693359375f);
  r = r - nf * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  return p * r * r + r + splat(1.0f);
}

// exp(x) to 1 ulp for |x| < 87; 0 below -87.3, clamped at 88. n = round(x log2 e); 2^n is
// applied by vscalefps on AVX-512, else built from its exponent bits.
static inline vf vexp(vf x) {
  x = x < splat(88.0f) ? x : splat(88.0f);
  const vf lo = splat(-87.3365447505531f);
#if defined(__AVX512F__)
  const vf nf = (vf)_mm512_roundscale_ps((__m512)(x * splat(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  const vf out = (vf)_mm512_scalef_ps((__m512)exp_reduced(x, nf), (__m512)nf);
  return x < lo ? splat(0.0f) : out;
#else
  const vi under = x < lo;
  x = x < lo ? lo : x;
  vf t = x * splat(1.44269504088896341f);
  t = t + (t < splat(0.0f) ? splat(-0.5f) : splat(0.5f));
  const vi n = __builtin_convertvector(t, vi);  // round half away from zero
  const vf nf = __builtin_convertvector(n, vf);
  const vi bits = (n + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  const vf out = exp_reduced(x, nf) * scale;
  return under ? splat(0.0f) : out;
#endif
}

// 1 / d: AVX-512's 14-bit reciprocal estimate and one Newton step (~1 ulp; a division costs
// ~1 cycle per float and bounds the SiLU passes), else the division.
static inline vf vrecip(vf d) {
#if defined(__AVX512F__)
  const vf r = (vf)_mm512_rcp14_ps((__m512)d);
  return r * (splat(2.0f) - d * r);
#else
  return splat(1.0f) / d;
#endif
}

static inline vf vsigmoid(vf z) { return vrecip(splat(1.0f) + vexp(-z)); }

}  // namespace synth_med
