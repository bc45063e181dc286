// The register-tiled kernel every native op but the norm is built on: a tile of
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

// C [M x Nc] = A [M x K] B [K x Nc], A read through strides, Nc a multiple of VL.
inline void gemm(int64_t M, int64_t Nc, int64_t K, const float* a, int64_t a_rs, int64_t a_ks,
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

// dst [cols x rows] = src [rows x cols]^T, src's rows src_rs apart: a `b` operand in the layout
// the tiles read. In 16 x 16 blocks, so reads and writes both stay within cache lines.
inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t src_rs, float* dst) {
  constexpr int64_t T = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += T)
    for (int64_t t0 = 0; t0 < cols; t0 += T) {
      const int64_t i1 = i0 + T < rows ? i0 + T : rows, t1 = t0 + T < cols ? t0 + T : cols;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t t = t0; t < t1; ++t) dst[t * rows + i] = src[i * src_rs + t];
    }
}

}  // namespace synth_med
