// Convolutions and dense layers with bfloat16 products and float32 sums, on the AMX tile units
// of Intel Xeons (Sapphire Rapids and later), as XLA FFI custom calls for the CPU:
//
//   conv3x3_bf16(x, kernel, flip)    the 3x3 'SAME' stride-1 convolution (NHWC, HWIO), or
//                                    (flip) its input gradient, as conv3x3.cc;
//   kernel_grad_bf16(x, g)           its kernel gradient (3, 3, M, N), as conv_kernel_grad.cc;
//   dense_bf16(x, kernel, transpose) a dense layer at every position (or its input gradient);
//   dense_grad_bf16(x, g)            its kernel gradient (M, N), as dense.cc.
//
// Each operand is rounded to bfloat16 (to nearest, ties to even) as it is copied into scratch;
// a product of two bfloat16 values is exact in float32, so the results equal float32 products
// of the rounded operands up to the order of the sums (jax's 'bfloat16' matmul precision).
//
// One engine serves all four. A "frame" holds an image's pixels in bfloat16, rows of W + 2b
// pixels with b zero pixels of border all round (b = 1 for the 3x3 convolution, 0 for the dense
// layer), each pixel Mp channels (M rounded up to 32, the padding zero). Output positions are
// numbered in the frame's width, p = y (W + 2b) + x, so each tap (i, j) of 16 consecutive
// positions reads 16 consecutive frame pixels i (W + 2b) + j further on: one tile load of one
// stride, whatever the image width. The 2b positions per row that fall in the border are
// computed and dropped.
//
// Forward: 32 positions x 32 output channels are 4 float32 accumulator tiles (16 x 16); each step
// over (tap, 32 input channels) loads two 16 x 32 tiles of positions and two of the kernel
// (pairs of input channels interleaved, as TDPBF16PS reads them) and issues 4 TDPBF16PS. The
// kernel gradient sums over positions instead: dk[tap] (M x N) += x^T (channels x positions,
// shifted by the tap) times g (positions x N, pairs of positions interleaved).
//
// Compiled only where the build targets AMX (-march=native on such a CPU); elsewhere this file
// defines `synth_med_amx_available` alone, returning 0, and synth_med uses its float32 kernels
// on rounded operands (the same maths).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>

#include "amx_gemm.h"
#include "ffi_common.h"
#include "scratch.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace ffi = xla::ffi;
using namespace synth_med;

namespace {

constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component
constexpr long kXfeatureXtiledata = 18;     // the AMX tile data

// Linux hands a process the AMX tile state only when asked; true once it has.
bool amx_permitted() {
  static std::once_flag once;
  static bool ok = false;
  std::call_once(once, [] { ok = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0; });
  return ok;
}

// Every tile 16 rows of 64 bytes: 16 x 16 float32 accumulators, or 16 x 32 bfloat16 operands.
// The 64-byte configuration: palette 1; bytes per row (16-bit) of tiles 0-7; rows of tiles
// 0-7; the rest zero. A constant in memory: GCC does not see LDTILECFG read a local's bytes and
// may drop the stores that zero them.
alignas(64) const uint8_t kTileConfig[64] = {
    1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0, 64, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0};

void configure_tiles() { _tile_loadconfig(kTileConfig); }

// float32 -> bfloat16, rounding to nearest with ties to even (NaNs stay NaNs).
inline uint16_t bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// n values of s rounded into d (AVX512-BF16's conversion where the CPU has it: the same
// rounding, but subnormal inputs become zero).
inline void to_bf16(const float* s, uint16_t* d, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512(d + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(s + i + 16), _mm512_loadu_ps(s + i)));
#endif
  for (; i < n; ++i) d[i] = bf16(s[i]);
}

#if defined(__AVX512BF16__)
// bfloat16 of a and b interleaved, a[0] b[0] a[1] b[1] ... a[15] b[15]: the pairs TDPBF16PS reads.
inline __m512i interleave_bf16(__m512 a, __m512 b) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}
#endif

// d[2c + e] = bf16 of (e ? b : a)[c * stride] for c < n: two rows interleaved, as TDPBF16PS
// reads pairs (of input channels in a kernel tile, of positions in an output-gradient tile);
// a null row is zeros.
inline void interleave_rows(const float* a, const float* b, uint16_t* d, int64_t n, int64_t stride = 1) {
  int64_t c = 0;
#if defined(__AVX512BF16__)
  const __m512i lanes = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(int(stride)));
  auto load = [&](const float* p) {
    if (!p) return _mm512_setzero_ps();
    return stride == 1 ? _mm512_loadu_ps(p) : _mm512_i32gather_ps(lanes, p, 4);
  };
  for (; c + 16 <= n; c += 16) {
    const __m512 va = load(a ? a + c * stride : nullptr), vb = load(b ? b + c * stride : nullptr);
    _mm512_storeu_si512(d + c * 2, interleave_bf16(va, vb));
  }
#endif
  for (; c < n; ++c) {
    d[c * 2] = a ? bf16(a[c * stride]) : 0;
    d[c * 2 + 1] = b ? bf16(b[c * stride]) : 0;
  }
}

#if defined(__AVX512F__)
// r[c] becomes column c of the 16 x 16 block r (rows r[0..15]).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // r[4i + k], 128-bit lane L: column 4L + k of rows 4i..4i+3
    r[4 * i] = (__m512)_mm512_unpacklo_pd((__m512d)t[4 * i], (__m512d)t[4 * i + 2]);
    r[4 * i + 1] = (__m512)_mm512_unpackhi_pd((__m512d)t[4 * i], (__m512d)t[4 * i + 2]);
    r[4 * i + 2] = (__m512)_mm512_unpacklo_pd((__m512d)t[4 * i + 1], (__m512d)t[4 * i + 3]);
    r[4 * i + 3] = (__m512)_mm512_unpackhi_pd((__m512d)t[4 * i + 1], (__m512d)t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 u = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), v = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    const __m512 u2 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD), v2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
    t[k] = _mm512_shuffle_f32x4(u, v, 0x88);
    t[8 + k] = _mm512_shuffle_f32x4(u, v, 0xDD);
    t[4 + k] = _mm512_shuffle_f32x4(u2, v2, 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(u2, v2, 0xDD);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
#endif

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// A scratch of n bfloat16 values (see scratch.h).
inline uint16_t* scratch_bf16(int slot, int64_t n) { return reinterpret_cast<uint16_t*>(scratch(slot, (n + 1) / 2)); }

// The geometry of a frame of n images stacked (see the top of the file): each image's rows
// follow the previous image's, with one shared zero row between them.
struct Frame {
  int64_t n, H, W, border, Wp;
  int64_t rows;    // frame rows per image: H + border
  int64_t P;       // computed positions, n * rows * Wp
  int64_t pixels;  // frame pixels any tap of a computed position reads (32-position runs)
  int ntaps;
  int64_t offs[9];

  static Frame conv(int64_t n, int64_t H, int64_t W) {
    Frame f{n, H, W, 1, W + 2, H + 1, n * (H + 1) * (W + 2), 0, 9, {}};
    for (int t = 0; t < 9; ++t) f.offs[t] = (t / 3) * f.Wp + t % 3;
    f.pixels = round_up(f.P, 32) + 2 * f.Wp + 2;
    return f;
  }
  static Frame dense(int64_t P) { return Frame{1, 1, P, 0, P, 1, P, round_up(P, 32), 1, {0}}; }

  // Frame pixel of image j's pixel (y, x), and output position of its output (y, x).
  int64_t pixel(int64_t j, int64_t y, int64_t x) const { return (j * rows + y + border) * Wp + x + border; }
  int64_t position(int64_t j, int64_t y, int64_t x) const { return (j * rows + y) * Wp + x; }
  // Index (j H + y) W + x of position p's output among the n images, or -1 in a border.
  int64_t index(int64_t p) const {
    const int64_t r = p / Wp, x = p % Wp, y = r % rows;
    return p < P && x < W && y < H ? ((r / rows) * H + y) * W + x : -1;
  }
};

// Images per frame: as many as keep `bytes_per_image` each within `budget` bytes, at least one.
inline int64_t images_per_frame(int64_t batch, int64_t bytes_per_image, int64_t budget) {
  return std::max<int64_t>(1, std::min<int64_t>(batch, budget / std::max<int64_t>(1, bytes_per_image)));
}

// The kernel as tiles [tap][32 input channels][16 output channels]: row r holds input channels
// (2r, 2r + 1) of the 32, interleaved, for each of the 16 output channels. Weight (m, n) of tap
// t is w[t * w_ts + m * w_ms + n * w_ns] (the rows past M are zero).
void pack_kernel(const float* w, int ntaps, int64_t w_ts, int64_t w_ms, int64_t w_ns, int64_t M, int64_t N,
                 uint16_t* kb) {
  const int64_t Mp = round_up(M, 32), KC = Mp / 32, NB = N / 16;
  int64_t m_done = 0;  // rows below it packed by the transposing path
#if defined(__AVX512BF16__)
  if (w_ms == 1 && M % 16 == 0) {  // a transposed kernel: 16 x 16 blocks transposed in registers, not gathered
    for (int t = 0; t < ntaps; ++t)
      for (int64_t m0 = 0; m0 < M; m0 += 16)
        for (int64_t nb = 0; nb < NB; ++nb) {
          __m512 r[16];
          for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(w + t * w_ts + m0 + (nb * 16 + i) * w_ns);
          transpose16(r);  // r[c][i]: weight (m0 + c, 16 nb + i)
          for (int c = 0; c < 16; c += 2) {
            const int64_t m = m0 + c;
            uint16_t* d = kb + (t * KC + m / 32) * NB * 512 + (m % 32) / 2 * 32 + nb * 512;
            _mm512_storeu_si512(d, interleave_bf16(r[c], r[c + 1]));
          }
        }
    m_done = M;
  }
#endif
  for (int t = 0; t < ntaps; ++t)
    for (int64_t m = m_done; m < Mp; m += 2) {
      const float* a = m < M ? w + t * w_ts + m * w_ms : nullptr;
      const float* b = m + 1 < M ? w + t * w_ts + (m + 1) * w_ms : nullptr;
      uint16_t* d = kb + (t * KC + m / 32) * NB * 512 + (m % 32) / 2 * 32;
      for (int64_t nb = 0; nb < NB; ++nb)
        interleave_rows(a ? a + nb * 16 * w_ns : nullptr, b ? b + nb * 16 * w_ns : nullptr, d + nb * 512, 16, w_ns);
    }
}

// The frame's n images (n x H x W x M float32) into it (Mp channels), the interiors only.
void copy_into_frame(const float* src, const Frame& f, int64_t M, int64_t Mp, uint16_t* frame) {
  for (int64_t j = 0; j < f.n; ++j)
    for (int64_t y = 0; y < f.H; ++y) {
      const float* row = src + (j * f.H + y) * f.W * M;
      if (M == Mp) {  // a row is contiguous in both
        to_bf16(row, frame + f.pixel(j, y, 0) * Mp, f.W * M);
        continue;
      }
      for (int64_t x = 0; x < f.W; ++x) to_bf16(row + x * M, frame + f.pixel(j, y, x) * Mp, M);
    }
}

// Accumulator tiles 0-3 = the 16-position runs starting at frame positions p0 and p1 (tiles
// 4, 5) times output channels nb0 and nb0 + 1 (two) of the packed kernel (tiles 6, 7).
inline void accumulate_runs(const uint16_t* frame, const Frame& f, int64_t Mp, const uint16_t* kb, int64_t NB,
                            int64_t nb0, bool two, int64_t p0, int64_t p1) {
  const int64_t KC = Mp / 32, a_stride = Mp * 2;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int t = 0; t < f.ntaps; ++t) {
    const uint16_t* a0 = frame + (p0 + f.offs[t]) * Mp;
    const uint16_t* a1 = frame + (p1 + f.offs[t]) * Mp;
    const uint16_t* k = kb + (t * KC * NB + nb0) * 512;
    for (int64_t kc = 0; kc < KC; ++kc, a0 += 32, a1 += 32, k += NB * 512) {
      _tile_loadd(4, a0, a_stride);
      _tile_loadd(5, a1, a_stride);
      _tile_loadd(6, k, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(2, 5, 6);
      if (two) {
        _tile_loadd(7, k + 512, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
  }
}

// dst (n x H x W x N float32) = the frame's images convolved with the packed kernel.
void forward(const uint16_t* frame, const Frame& f, int64_t Mp, const uint16_t* kb, int64_t N, float* dst,
             float* tmp) {
  const int64_t NB = N / 16, c_stride = N * 4;
  if (f.W >= 16) {
    // Runs of 16 positions within a row (the last one of a row shifted left to end at its end,
    // recomputing a few), two at a time; the tiles go straight to dst.
    const int64_t per_row = (f.W + 15) / 16, runs = f.n * f.H * per_row;
    auto start = [&](int64_t r, int64_t* p, float** d) {
      const int64_t row = r / per_row, j = row / f.H, y = row % f.H, x = std::min((r % per_row) * 16, f.W - 16);
      *p = f.position(j, y, x);
      *d = dst + (row * f.W + x) * N;
    };
    for (int64_t r = 0; r < runs; r += 2) {
      int64_t p0, p1;
      float *d0, *d1;
      start(r, &p0, &d0);
      start(std::min(r + 1, runs - 1), &p1, &d1);
      for (int64_t nb0 = 0; nb0 < NB; nb0 += 2) {
        const bool two = nb0 + 1 < NB;
        accumulate_runs(frame, f, Mp, kb, NB, nb0, two, p0, p1);
        _tile_stored(0, d0 + nb0 * 16, c_stride);
        _tile_stored(2, d1 + nb0 * 16, c_stride);
        if (two) {
          _tile_stored(1, d0 + nb0 * 16 + 16, c_stride);
          _tile_stored(3, d1 + nb0 * 16 + 16, c_stride);
        }
      }
    }
    return;
  }
  // Narrow images: 32 consecutive frame positions at a time, across rows and images, through
  // tmp (32 positions x 32 channels), dropping the positions in the borders.
  for (int64_t p0 = 0; p0 < f.P; p0 += 32) {
    for (int64_t nb0 = 0; nb0 < NB; nb0 += 2) {
      const bool two = nb0 + 1 < NB;
      accumulate_runs(frame, f, Mp, kb, NB, nb0, two, p0, p0 + 16);
      _tile_stored(0, tmp, 128);
      _tile_stored(2, tmp + 16 * 32, 128);
      if (two) {
        _tile_stored(1, tmp + 16, 128);
        _tile_stored(3, tmp + 16 * 32 + 16, 128);
      }
      const int64_t cols = two ? 32 : 16;
      for (int64_t r = 0; r < 32; ++r) {
        const int64_t i = f.index(p0 + r);
        if (i >= 0) std::memcpy(dst + i * N + nb0 * 16, tmp + r * 32, sizeof(float) * cols);
      }
    }
  }
}

// The packed kernel (see pack_kernel) of `ntaps` taps of weights k: (M x N) each, or with
// `transposed` (N x M) each, transposed and taken in reverse tap order (the input gradient's).
// Null when the scratch cannot be had.
const uint16_t* packed_kernel(const float* k, int ntaps, bool transposed, int64_t M, int64_t N) {
  uint16_t* kb = scratch_bf16(0, ntaps * round_up(M, 32) * N);
  if (!kb) return nullptr;
  if (transposed)  // tap t is stored tap ntaps - 1 - t, (n, m) at k[n * M + m]
    pack_kernel(k + (ntaps - 1) * M * N, ntaps, -M * N, 1, M, M, N, kb);
  else
    pack_kernel(k, ntaps, M * N, N, 1, M, N, kb);
  return kb;
}

// Frames' worth of bytes the forward keeps in cache (of a core's 2 MB L2).
constexpr int64_t kFrameBytes = 512 * 1024;

// Convolutions (or dense layers) of `batch` images of `image_pixels` pixels with the packed
// kernel kb, stacked in frames (`frame_of(n)`: the frame of n images).
template <typename MakeFrame>
bool apply(const float* in, float* out, int64_t batch, int64_t image_pixels, MakeFrame frame_of, int64_t M, int64_t N,
           const uint16_t* kb) {
  const int64_t Mp = round_up(M, 32);
  const int64_t G = images_per_frame(batch, frame_of(1).pixels * Mp * 2, kFrameBytes);
  const Frame full = frame_of(G);
  uint16_t* frame = scratch_bf16(1, full.pixels * Mp);
  float* tmp = scratch(2, 32 * 32);
  if (!frame || !tmp) return false;
  std::memset(frame, 0, sizeof(uint16_t) * full.pixels * Mp);  // the borders and padding channels stay zero
  configure_tiles();
  for (int64_t b = 0; b < batch; b += G) {
    const Frame f = frame_of(std::min(G, batch - b));
    copy_into_frame(in + b * image_pixels * M, f, M, Mp, frame);
    forward(frame, f, Mp, kb, N, out + b * image_pixels * N, tmp);
  }
  _tile_release();
  return true;
}

// Positions per chunk of the kernel gradient: a chunk's x^T rows and g pairs stay in L1 while
// the 9 taps and the channel blocks run over them.
constexpr int64_t kGradChunk = 256;

// acc[tap] (Mp x N) += sum over the image's positions p of x[p + tap] (x^T: xt, rows of Q) g[p]
// (gv: pairs of positions interleaved), a chunk of positions at a time.
void accumulate_kernel_grad(const uint16_t* xt, int64_t Q, int64_t Mp, const Frame& f, const uint16_t* gv,
                            int64_t N, float* acc) {
  const int64_t NB = N / 16, P32 = round_up(f.P, 32), c_stride = N * 4;
  for (int64_t q0 = 0; q0 < P32; q0 += kGradChunk) {
    const int64_t q1 = std::min<int64_t>(P32, q0 + kGradChunk);
    for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
      for (int64_t nb0 = 0; nb0 < NB; nb0 += 2) {
        const bool two = nb0 + 1 < NB;
        for (int t = 0; t < f.ntaps; ++t) {
          float* c = acc + (t * Mp + m0) * N + nb0 * 16;
          _tile_loadd(0, c, c_stride);
          _tile_loadd(2, c + 16 * N, c_stride);
          if (two) {
            _tile_loadd(1, c + 16, c_stride);
            _tile_loadd(3, c + 16 * N + 16, c_stride);
          }
          const uint16_t* a = xt + m0 * Q + f.offs[t] + q0;
          const uint16_t* v = gv + nb0 * 32 + q0 * N;
          for (int64_t p0 = q0; p0 < q1; p0 += 32, a += 32, v += 16 * N * 2) {
            _tile_loadd(4, a, Q * 2);
            _tile_loadd(5, a + 16 * Q, Q * 2);
            _tile_loadd(6, v, N * 4);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(2, 5, 6);
            if (two) {
              _tile_loadd(7, v + 32, N * 4);
              _tile_dpbf16ps(1, 4, 7);
              _tile_dpbf16ps(3, 5, 7);
            }
          }
          _tile_stored(0, c, c_stride);
          _tile_stored(2, c + 16 * N, c_stride);
          if (two) {
            _tile_stored(1, c + 16, c_stride);
            _tile_stored(3, c + 16 * N + 16, c_stride);
          }
        }
      }
    }
  }
}

// xt[m * Q + f.pixel(j, y, x)] = bf16(src[(y W + x) M + m]): image j's pixels (H W x M, float32)
// transposed into the frame's x^T, channels as rows.
void transpose_image(const float* src, const Frame& f, int64_t j, int64_t M, uint16_t* xt, int64_t Q) {
  const int64_t HW = f.H * f.W;
  int64_t i0 = 0;
#if defined(__AVX512BF16__)
  if (M % 16 == 0) {
    alignas(64) uint16_t tmp[16][16];
    for (; i0 + 16 <= HW; i0 += 16)
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (i0 + i) * M + m0);
        transpose16(r);  // r[c]: pixels i0..i0+15 of channel m0 + c
        if (f.W % 16 == 0) {  // the 16 pixels are one run of a row
          uint16_t* d = xt + m0 * Q + f.pixel(j, i0 / f.W, i0 % f.W);
          for (int c = 0; c < 16; ++c) _mm256_storeu_si256((__m256i*)(d + c * Q), (__m256i)_mm512_cvtneps_pbh(r[c]));
          continue;
        }
        for (int c = 0; c < 16; ++c) _mm256_store_si256((__m256i*)tmp[c], (__m256i)_mm512_cvtneps_pbh(r[c]));
        for (int64_t i = i0; i < i0 + 16;) {  // runs of the 16 pixels within rows
          const int64_t y = i / f.W, x = i % f.W, len = std::min(f.W - x, i0 + 16 - i);
          uint16_t* d = xt + m0 * Q + f.pixel(j, y, x);
          for (int c = 0; c < 16; ++c) std::memcpy(d + c * Q, tmp[c] + (i - i0), len * 2);
          i += len;
        }
      }
  }
#endif
  for (int64_t i = i0; i < HW; ++i) {
    uint16_t* d = xt + f.pixel(j, i / f.W, i % f.W);
    for (int64_t m = 0; m < M; ++m) d[m * Q] = bf16(src[i * M + m]);
  }
}

// gv[p / 2][n][p % 2] = bf16(g)[position p, n] for the frame's positions p; the positions in
// the borders are left as they are (zero). A pair never holds pixels of two rows: the position
// before a row's first is a border (or the frame's start).
void interleave_pairs(const float* g, const Frame& f, int64_t N, uint16_t* gv) {
  for (int64_t j = 0; j < f.n; ++j)
    for (int64_t y = 0; y < f.H; ++y) {
      const int64_t p_row = f.position(j, y, 0);
      const float* g_row = g + (j * f.H + y) * f.W * N;
      for (int64_t p = p_row & ~int64_t(1); p < p_row + f.W; p += 2) {
        const int64_t xa = p - p_row, xb = xa + 1;
        interleave_rows(xa >= 0 ? g_row + xa * N : nullptr, xb < f.W ? g_row + xb * N : nullptr, gv + p * N, N);
      }
    }
}

// Bytes of x^T and g the kernel gradient keeps in cache per frame.
constexpr int64_t kGradFrameBytes = 1024 * 1024;

// dk[t, m, n] = sum over images and positions of bf16(x)[p + tap t, m] * bf16(g)[p, n], for
// `batch` images of `image_pixels` pixels stacked in frames of frame_of's kind.
template <typename MakeFrame>
bool kernel_grad(const float* x, const float* g, float* dk, int64_t batch, int64_t image_pixels, MakeFrame frame_of,
                 int64_t M, int64_t N) {
  const int64_t Mp = round_up(M, 32);
  const Frame one = frame_of(1);
  const int64_t G = images_per_frame(batch, one.pixels * (Mp + N) * 2, kGradFrameBytes);
  const Frame full = frame_of(G);
  const int64_t Q = round_up(full.pixels, 32), P32 = round_up(full.P, 32);
  uint16_t* xt = scratch_bf16(0, Mp * Q);
  uint16_t* gv = scratch_bf16(1, P32 * N);  // [P32 / 2][N][2]
  float* acc = scratch(2, one.ntaps * Mp * N);
  if (!xt || !gv || !acc) return false;
  std::memset(xt, 0, sizeof(uint16_t) * Mp * Q);
  std::memset(gv, 0, sizeof(uint16_t) * P32 * N);  // positions in the borders stay zero
  std::memset(acc, 0, sizeof(float) * one.ntaps * Mp * N);
  configure_tiles();
  for (int64_t b = 0; b < batch; b += G) {
    const Frame f = frame_of(std::min(G, batch - b));
    const float* xs = x + b * image_pixels * M;
    for (int64_t j = 0; j < f.n; ++j) transpose_image(xs + j * image_pixels * M, f, j, M, xt, Q);
    // A smaller last frame: its positions past P read g as zero (the larger frame wrote them).
    std::memset(gv + f.P * N, 0, sizeof(uint16_t) * (round_up(f.P, 32) - f.P) * N);
    interleave_pairs(g + b * image_pixels * N, f, N, gv);
    accumulate_kernel_grad(xt, Q, Mp, f, gv, N, acc);
  }
  _tile_release();
  for (int t = 0; t < one.ntaps; ++t) std::memcpy(dk + t * M * N, acc + t * Mp * N, sizeof(float) * M * N);
  return true;
}

// A dense layer's P positions, as "images" of kDenseRun positions (and one of the rest), so the
// frames' budgets apply to it as to the convolution's images.
constexpr int64_t kDenseRun = 256;

auto dense_frames(int64_t run) {
  return [run](int64_t n) { return Frame::dense(n * run); };
}

bool dense(const float* x, float* y, int64_t P, int64_t M, int64_t N, const uint16_t* kb) {
  const int64_t runs = P / kDenseRun, rest = P - runs * kDenseRun;
  if (runs && !apply(x, y, runs, kDenseRun, dense_frames(kDenseRun), M, N, kb)) return false;
  return !rest || apply(x + runs * kDenseRun * M, y + runs * kDenseRun * N, 1, rest, dense_frames(rest), M, N, kb);
}

bool dense_grad(const float* x, const float* g, float* dk, int64_t P, int64_t M, int64_t N, float* part) {
  const int64_t runs = P / kDenseRun, rest = P - runs * kDenseRun;
  if (runs && !kernel_grad(x, g, dk, runs, kDenseRun, dense_frames(kDenseRun), M, N)) return false;
  if (!runs) std::memset(dk, 0, sizeof(float) * M * N);
  if (!rest) return true;
  if (!kernel_grad(x + runs * kDenseRun * M, g + runs * kDenseRun * N, part, 1, rest, dense_frames(rest), M, N))
    return false;
  for (int64_t i = 0; i < M * N; ++i) dk[i] += part[i];
  return true;
}

// A 3x3 convolution's H x W images, stacked n to a frame.
auto conv_frames(int64_t H, int64_t W) {
  return [H, W](int64_t n) { return Frame::conv(n, H, W); };
}

ffi::Error invalid(const char* what) { return ffi::Error(ffi::ErrorCode::kInvalidArgument, what); }

ffi::Error unavailable() {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "synth_med AMX kernels: the OS did not grant this process the AMX tile state");
}

ffi::Error Conv3x3Impl(ffi::Buffer<ffi::F32> in, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> out,
                       bool flip) {
  auto di = in.dimensions(), dk = kernel.dimensions(), dout = out->dimensions();
  if (di.size() != 4 || dk.size() != 4 || dk[0] != 3 || dk[1] != 3)
    return invalid("conv3x3_bf16: input must be NHWC and the kernel (3, 3, ., .)");
  const int64_t M = di[3], N = flip ? dk[2] : dk[3];
  if ((flip ? dk[3] : dk[2]) != M) return invalid("conv3x3_bf16: kernel channels do not match the input's");
  if (dout.size() != 4 || dout[0] != di[0] || dout[1] != di[1] || dout[2] != di[2] || dout[3] != N)
    return invalid("conv3x3_bf16: result must be (b, h, w, output channels)");
  if (N % 16 != 0) return invalid("conv3x3_bf16: output channels must be a multiple of 16");
  if (!amx_permitted()) return unavailable();
  // flip: the kernel operand is (3, 3, N, M), used spatially flipped with its channel axes swapped.
  const uint16_t* kb = packed_kernel(kernel.typed_data(), 9, flip, M, N);
  if (!kb || !apply(in.typed_data(), out->typed_data(), di[0], di[1] * di[2], conv_frames(di[1], di[2]), M, N, kb))
    return out_of_memory();
  return ffi::Error::Success();
}

ffi::Error KernelGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk) {
  auto dx = x.dimensions(), dg = g.dimensions(), dd = dk->dimensions();
  if (dx.size() != 4 || dg.size() != 4 || dx[0] != dg[0] || dx[1] != dg[1] || dx[2] != dg[2])
    return invalid("kernel_grad_bf16: operands must be NHWC of one shape but channels");
  if (dd.size() != 4 || dd[0] != 3 || dd[1] != 3 || dd[2] != dx[3] || dd[3] != dg[3])
    return invalid("kernel_grad_bf16: result must be (3, 3, channels of x, channels of g)");
  if (dg[3] % 16 != 0) return invalid("kernel_grad_bf16: g's channels must be a multiple of 16");
  if (!amx_permitted()) return unavailable();
  if (!kernel_grad(x.typed_data(), g.typed_data(), dk->typed_data(), dx[0], dx[1] * dx[2], conv_frames(dx[1], dx[2]),
                   dx[3], dg[3]))
    return out_of_memory();
  return ffi::Error::Success();
}

ffi::Error DenseImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                     bool transpose_kernel) {
  auto dx = x.dimensions(), dk = kernel.dimensions(), dy = y->dimensions();
  const int64_t P = positions(dx, dy);
  if (P < 0 || dk.size() != 2) return invalid("dense_bf16: x and the result must agree but in their last axis, the kernel be 2-D");
  const int64_t M = dx[dx.size() - 1], N = dy[dy.size() - 1];
  if (dk[0] != (transpose_kernel ? N : M) || dk[1] != (transpose_kernel ? M : N))
    return invalid("dense_bf16: the kernel's shape does not match x and the result");
  if (N % 16 != 0) return invalid("dense_bf16: output channels must be a multiple of 16");
  if (!amx_permitted()) return unavailable();
  const uint16_t* kb = packed_kernel(kernel.typed_data(), 1, transpose_kernel, M, N);
  if (!kb || !dense(x.typed_data(), y->typed_data(), P, M, N, kb)) return out_of_memory();
  return ffi::Error::Success();
}

ffi::Error DenseGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk) {
  auto dx = x.dimensions(), dg = g.dimensions(), dd = dk->dimensions();
  const int64_t P = positions(dx, dg);
  if (P < 0) return invalid("dense_grad_bf16: operands must agree but in their last axis");
  const int64_t M = dx[dx.size() - 1], N = dg[dg.size() - 1];
  if (dd.size() != 2 || dd[0] != M || dd[1] != N) return invalid("dense_grad_bf16: result must be (channels of x, channels of g)");
  if (N % 16 != 0) return invalid("dense_grad_bf16: g's channels must be a multiple of 16");
  if (!amx_permitted()) return unavailable();
  float* part = scratch(3, M * N);
  if (!part || !dense_grad(x.typed_data(), g.typed_data(), dk->typed_data(), P, M, N, part)) return out_of_memory();
  return ffi::Error::Success();
}

// dst[r * dst_ld + j] = src[j * src_ld + r] for j < 16, r < len: 16 rows of 32-bit values
// (pairs of bfloat16) transposed, 16 x 16 blocks in registers, the rest a gather per row of dst.
inline void transpose16_u32(const uint32_t* src, int64_t src_ld, int64_t len, uint32_t* dst, int64_t dst_ld) {
  int64_t r = 0;
#if defined(__AVX512F__)
  for (; r + 16 <= len; r += 16) {
    __m512 v[16];
    for (int j = 0; j < 16; ++j) v[j] = _mm512_castsi512_ps(_mm512_loadu_si512(src + j * src_ld + r));
    transpose16(v);  // v[c][j] = src[j][r + c]
    for (int c = 0; c < 16; ++c) _mm512_storeu_si512(dst + (r + c) * dst_ld, _mm512_castps_si512(v[c]));
  }
  const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32(int(src_ld)));
  for (; r < len; ++r) _mm512_storeu_si512(dst + r * dst_ld, _mm512_i32gather_epi32(idx, src + r, 4));
#endif
  for (; r < len; ++r)
    for (int64_t j = 0; j < 16; ++j) dst[r * dst_ld + j] = src[j * src_ld + r];
}

// A[m][k] = a[m * rs + k * ks] (m < rows, k < cols) into d, rows of ld bfloat16 (ld a multiple
// of 32, zero past cols). Rows of A contiguous (ks == 1) are converted as they are; columns
// contiguous (rs == 1: A a transpose) are interleaved in pairs and transposed 16 pairs at a time.
// False when the scratch cannot be had.
bool pack_a(const float* a, int64_t rows, int64_t cols, int64_t rs, int64_t ks, uint16_t* d, int64_t ld) {
  if (ks == 1) {
    for (int64_t m = 0; m < rows; ++m) {
      to_bf16(a + m * rs, d + m * ld, cols);
      std::memset(d + m * ld + cols, 0, (ld - cols) * 2);
    }
  } else if (rs == 1) {
    uint16_t* pairs = scratch_bf16(3, 32 * rows);  // [16 pairs of k][rows][2]
    if (!pairs) return false;
    for (int64_t k0 = 0; k0 < ld; k0 += 32) {
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t k = k0 + 2 * j;
        interleave_rows(k < cols ? a + k * ks : nullptr, k + 1 < cols ? a + (k + 1) * ks : nullptr,
                        pairs + j * rows * 2, rows);
      }
      transpose16_u32(reinterpret_cast<const uint32_t*>(pairs), rows, rows, reinterpret_cast<uint32_t*>(d) + k0 / 2,
                      ld / 2);
    }
  } else {
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t k = 0; k < ld; ++k) d[m * ld + k] = k < cols ? bf16(a[m * rs + k * ks]) : 0;
  }
  return true;
}

// B[k][n] = b[k * ks + n * ns] (k < K, n < Nc) into d as TDPBF16PS reads it: [Kp / 2][ld][2]
// (ld >= Nc), pairs of k interleaved (zero past K). Rows of B contiguous (ns == 1) are
// interleaved in pairs; columns contiguous (ks == 1: B a transpose) are converted, their pairs
// of k already adjacent, and transposed 16 columns at a time. False when the scratch cannot be had.
bool pack_b(const float* b, int64_t K, int64_t Kp, int64_t Nc, int64_t ks, int64_t ns, uint16_t* d, int64_t ld) {
  uint32_t* d32 = reinterpret_cast<uint32_t*>(d);
  if (ns == 1) {
    for (int64_t r = 0; r < Kp / 2; ++r)
      interleave_rows(2 * r < K ? b + 2 * r * ks : nullptr, 2 * r + 1 < K ? b + (2 * r + 1) * ks : nullptr,
                      d + r * ld * 2, Nc);
  } else if (ks == 1) {
    uint16_t* cols = scratch_bf16(3, 16 * Kp);  // [16 columns][Kp]
    if (!cols) return false;
    for (int64_t n0 = 0; n0 < Nc; n0 += 16) {
      for (int64_t j = 0; j < 16; ++j) {
        to_bf16(b + (n0 + j) * ns, cols + j * Kp, K);
        std::memset(cols + j * Kp + K, 0, (Kp - K) * 2);
      }
      transpose16_u32(reinterpret_cast<const uint32_t*>(cols), Kp / 2, Kp / 2, d32 + n0, ld);
    }
  } else {
    for (int64_t r = 0; r < Kp / 2; ++r)
      for (int64_t n = 0; n < Nc; ++n) {
        const uint32_t lo = 2 * r < K ? bf16(b[2 * r * ks + n * ns]) : 0;
        const uint32_t hi = 2 * r + 1 < K ? bf16(b[(2 * r + 1) * ks + n * ns]) : 0;
        d32[r * ld + n] = lo | hi << 16;
      }
  }
  return true;
}

// Tiles 0-3 = rows m0.. (RM tiles of 16) x columns n0.. (RN tiles of 16) of the packed A B
// (B's rows ldb pairs long), stored to out (row stride ldo floats).
template <int RM, int RN>
void gemm_block(const uint16_t* ap, int64_t Kp, const uint16_t* bp, int64_t ldb, int64_t m0, int64_t n0, float* out,
                int64_t ldo) {
  _tile_zero(0);
  if constexpr (RN > 1) _tile_zero(1);
  if constexpr (RM > 1) _tile_zero(2);
  if constexpr (RM > 1 && RN > 1) _tile_zero(3);
  for (int64_t kc = 0; kc < Kp / 32; ++kc) {
    const uint16_t* a = ap + m0 * Kp + kc * 32;
    const uint16_t* b = bp + kc * 16 * ldb * 2 + n0 * 2;
    _tile_loadd(4, a, Kp * 2);
    _tile_loadd(6, b, ldb * 4);
    if constexpr (RM > 1) _tile_loadd(5, a + 16 * Kp, Kp * 2);
    if constexpr (RN > 1) _tile_loadd(7, b + 32, ldb * 4);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (RN > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (RM > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (RM > 1 && RN > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, out, ldo * 4);
  if constexpr (RN > 1) _tile_stored(1, out + 16, ldo * 4);
  if constexpr (RM > 1) _tile_stored(2, out + 16 * ldo, ldo * 4);
  if constexpr (RM > 1 && RN > 1) _tile_stored(3, out + 16 * ldo + 16, ldo * 4);
}

}  // namespace

bool synth_med::amx_gemm(int64_t M, int64_t Nc, int64_t K, const float* a, int64_t a_rs, int64_t a_ks,
                         const float* b, int64_t b_ks, int64_t b_ns, float* c, int64_t ldc, bool c_transposed) {
  if (M % 16 || Nc % 16 || K <= 0 || !amx_permitted()) return false;
  // B's rows padded by 16 pairs, so that a tile's 16 rows do not share a few cache sets
  const int64_t Kp = round_up(K, 32), ldb = Nc + 16;
  uint16_t* ap = scratch_bf16(4, M * Kp);
  uint16_t* bp = scratch_bf16(5, Kp * ldb);
  if (!ap || !bp) return false;
  if (!pack_a(a, M, K, a_rs, a_ks, ap, Kp) || !pack_b(b, K, Kp, Nc, b_ks, b_ns, bp, ldb)) return false;
  configure_tiles();
  alignas(64) float tmp[32 * 32];
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    const bool two_m = M - m0 >= 32;
    for (int64_t n0 = 0; n0 < Nc; n0 += 32) {
      const bool two_n = Nc - n0 >= 32;
      float* out = c_transposed ? tmp : c + m0 * ldc + n0;
      const int64_t ldo = c_transposed ? 32 : ldc;
      if (two_m && two_n) gemm_block<2, 2>(ap, Kp, bp, ldb, m0, n0, out, ldo);
      else if (two_m) gemm_block<2, 1>(ap, Kp, bp, ldb, m0, n0, out, ldo);
      else if (two_n) gemm_block<1, 2>(ap, Kp, bp, ldb, m0, n0, out, ldo);
      else gemm_block<1, 1>(ap, Kp, bp, ldb, m0, n0, out, ldo);
      if (c_transposed) {  // column j of tmp is row n0 + j of c: 16 rows of tmp at a time
        const uint32_t* t32 = reinterpret_cast<const uint32_t*>(tmp);
        uint32_t* c32 = reinterpret_cast<uint32_t*>(c);
        for (int64_t i0 = 0; i0 < (two_m ? 32 : 16); i0 += 16)
          transpose16_u32(t32 + i0 * 32, 32, two_n ? 32 : 16, c32 + n0 * ldc + m0 + i0, ldc);
      }
    }
  }
  _tile_release();
  return true;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedConv3x3Bf16, Conv3x3Impl,
                              two_buffers_to_one().Attr<bool>("flip"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedKernelGradBf16, KernelGradImpl,
                              two_buffers_to_one());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedDenseBf16, DenseImpl,
                              two_buffers_to_one().Attr<bool>("transpose_kernel"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedDenseGradBf16, DenseGradImpl,
                              two_buffers_to_one());

// 1 when the AMX kernels are compiled in and the OS grants this process the tile state.
extern "C" int synth_med_amx_available() { return amx_permitted() ? 1 : 0; }

#else

bool synth_med::amx_gemm(int64_t, int64_t, int64_t, const float*, int64_t, int64_t, const float*, int64_t, int64_t,
                         float*, int64_t, bool) {
  return false;
}

extern "C" int synth_med_amx_available() { return 0; }

#endif
