// The register-tiled kernel both conv_kernel_grad.cc and attention.cc are built on: a tile of
// R x (NV * VL) outputs accumulated in registers as a sum of outer products, one scalar of `a`
// broadcast against one row of `b` vectors per step. The sum runs over segments (runs of
// steps: the conv kernel gradient's image-row pieces; attention's one run per product).
#pragma once
#include <cstdint>

#include "simd.h"

namespace synth_med {

#if defined(__AVX512F__)
constexpr int MR = 8;  // rows of a tile: 8 x 2 vectors of accumulators use 16 of 32 registers
#else
constexpr int MR = 6;  // 12 of 16 registers
#endif

// One run of steps: `a` and `b` at its first step, `len` steps.
struct Segment { const float* a; const float* b; int64_t len; };

// c[r, :NV*VL] (+)= sum over each segment's steps k of a[a_off + r * a_rs + k * a_ks] *
// b[b_off + k * b_ks + :NV*VL], for r < R; += when ACC, else the tile is overwritten.
template <int R, int NV, bool ACC>
inline void tile(const Segment* segs, int nseg, int64_t a_off, int64_t b_off, int64_t a_rs,
                 int64_t a_ks, int64_t b_ks, float* c, int64_t c_rs) {
  vf acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) acc[r][q] = ACC ? load(c + r * c_rs + q * VL) : vf{};
  for (int s = 0; s < nseg; ++s) {
    const float* a = segs[s].a + a_off;
    const float* b = segs[s].b + b_off;
    for (int64_t k = 0; k < segs[s].len; ++k, a += a_ks, b += b_ks) {
      vf bv[NV];
#pragma GCC unroll 4
      for (int q = 0; q < NV; ++q) bv[q] = load(b + q * VL);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const float ar = a[r * a_rs];
#pragma GCC unroll 4
        for (int q = 0; q < NV; ++q) acc[r][q] += ar * bv[q];
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < NV; ++q) store(c + r * c_rs + q * VL, acc[r][q]);
}

// `tile` for 1..MR rows.
template <int NV, bool ACC>
inline void tile_rows(int rows, const Segment* segs, int nseg, int64_t a_off, int64_t b_off, int64_t a_rs,
                      int64_t a_ks, int64_t b_ks, float* c, int64_t c_rs) {
  switch (rows) {
    case 1: return tile<1, NV, ACC>(segs, nseg, a_off, b_off, a_rs, a_ks, b_ks, c, c_rs);
    case 2: return tile<2, NV, ACC>(segs, nseg, a_off, b_off, a_rs, a_ks, b_ks, c, c_rs);
    case 3: return tile<3, NV, ACC>(segs, nseg, a_off, b_off, a_rs, a_ks, b_ks, c, c_rs);
    case 4: return tile<4, NV, ACC>(segs, nseg, a_off, b_off, a_rs, a_ks, b_ks, c, c_rs);
    case 5: return tile<5, NV, ACC>(segs, nseg, a_off, b_off, a_rs, a_ks, b_ks, c, c_rs);
#if defined(__AVX512F__)
    case 6: return tile<6, NV, ACC>(segs, nseg, a_off, b_off, a_rs, a_ks, b_ks, c, c_rs);
    case 7: return tile<7, NV, ACC>(segs, nseg, a_off, b_off, a_rs, a_ks, b_ks, c, c_rs);
#endif
    default: return tile<MR, NV, ACC>(segs, nseg, a_off, b_off, a_rs, a_ks, b_ks, c, c_rs);
  }
}

// c [M x Nc] (+)= sum over the segments of a [M x steps] b [steps x Nc], Nc a multiple of VL.
template <bool ACC>
inline void tiled_product(int64_t M, int64_t Nc, const Segment* segs, int nseg, int64_t a_rs, int64_t a_ks,
                          int64_t b_ks, float* c, int64_t c_rs) {
  for (int64_t m = 0; m < M; m += MR) {
    const int rows = int(M - m < MR ? M - m : MR);
    int64_t n = 0;
    for (; n + 2 * VL <= Nc; n += 2 * VL)
      tile_rows<2, ACC>(rows, segs, nseg, m * a_rs, n, a_rs, a_ks, b_ks, c + m * c_rs + n, c_rs);
    for (; n < Nc; n += VL)
      tile_rows<1, ACC>(rows, segs, nseg, m * a_rs, n, a_rs, a_ks, b_ks, c + m * c_rs + n, c_rs);
  }
}

}  // namespace synth_med
