// The 3x3 'SAME' stride-1 convolution with bfloat16 products and float32 accumulation, on the
// AMX tile units of Intel Xeons (Sapphire Rapids and later): the forward convolution, its input
// gradient (`flip`, as in conv3x3.cc) and its kernel gradient (as conv_kernel_grad.cc). Each
// operand is rounded to bfloat16 (to nearest, ties to even) as it is copied into scratch; every
// product of two bfloat16 values is exact in float32, so these equal XLA's float32 convolution
// of the rounded operands up to the order of the sums: jax's 'bfloat16' matmul precision.
//
// Layout. An image is copied once into a zero-bordered bfloat16 scratch, (H + 2) x (W + 2)
// pixels of Mp channels (M rounded up to 32, the padding zero). Output positions are numbered
// in that padded width, p = y (W + 2) + x, so tap (i, j) of a run of 16 consecutive positions
// reads 16 consecutive scratch pixels starting i (W + 2) + j further on: one tile load of one
// stride, whatever the image width. The two positions per row that fall in the border (x >= W)
// are computed and dropped.
//
// Forward: a tile of 32 positions x 32 output channels is 4 float32 accumulator tiles (16 x 16);
// each step over (tap, 32 input channels) loads two 16 x 32 position tiles and two kernel
// tiles (pairs of input channels interleaved, the layout TDPBF16PS reads) and issues 4 TDPBF16PS.
// Kernel gradient: the same over positions instead of channels, dk[tap] (M x N) accumulating
// x^T (channels x positions, shifted by the tap) times g (positions x N, pairs of positions
// interleaved).
//
// Compiled only where the build targets AMX (-march=native on such a CPU); elsewhere the file
// defines `synth_med_amx_available` alone, returning 0, and synth_med uses its other paths.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>

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
void configure_tiles() {
  struct __attribute__((packed)) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

// float32 -> bfloat16, rounding to nearest with ties to even (NaNs stay NaNs).
inline uint16_t bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// A scratch of n bfloat16 values (see scratch.h).
inline uint16_t* scratch_bf16(int slot, int64_t n) { return reinterpret_cast<uint16_t*>(scratch(slot, (n + 1) / 2)); }

// Image b of `in` (H x W x M float32) into the padded bfloat16 scratch, its interior only.
void copy_image(const float* src, uint16_t* pad, int64_t H, int64_t W, int64_t M, int64_t Mp) {
  const int64_t Wp = W + 2;
  for (int64_t y = 0; y < H; ++y)
    for (int64_t x = 0; x < W; ++x) {
      const float* s = src + (y * W + x) * M;
      uint16_t* d = pad + ((y + 1) * Wp + x + 1) * Mp;
      for (int64_t m = 0; m < M; ++m) d[m] = bf16(s[m]);
    }
}

bool conv3x3_amx(const float* in, const float* kernel, float* out, int64_t B, int64_t H, int64_t W, int64_t M,
                 int64_t N, bool flip) {
  const int64_t Mp = round_up(M, 32), KC = Mp / 32, NB = N / 16, Wp = W + 2;
  const int64_t P = H * Wp, P32 = round_up(P, 32);
  // The kernel as tiles [tap][32 input channels][16 output channels]: row r holds input channels
  // (2r, 2r + 1) of the 32, interleaved, for each of the 16 output channels.
  uint16_t* kb = scratch_bf16(0, 9 * KC * NB * 512);
  const int64_t npix = P32 + 2 * Wp + 2;  // every pixel a tap of a computed position reads
  uint16_t* pad = scratch_bf16(1, npix * Mp);
  float* tmp = scratch(2, 32 * 32);
  if (!kb || !pad || !tmp) return false;
  for (int t = 0; t < 9; ++t)
    for (int64_t m = 0; m < Mp; ++m)
      for (int64_t n = 0; n < N; ++n) {
        float v = 0.0f;
        if (m < M) v = flip ? kernel[(((8 - t) * N) + n) * M + m] : kernel[(t * M + m) * N + n];
        const int64_t kc = m / 32, r = (m % 32) / 2, e = m % 2, nb = n / 16, c = n % 16;
        kb[((t * KC + kc) * NB + nb) * 512 + r * 32 + c * 2 + e] = bf16(v);
      }
  std::memset(pad, 0, sizeof(uint16_t) * npix * Mp);  // the border and the padding channels stay zero
  configure_tiles();
  const int64_t a_stride = Mp * 2;
  for (int64_t b = 0; b < B; ++b) {
    copy_image(in + b * H * W * M, pad, H, W, M, Mp);
    float* dst = out + b * H * W * N;
    for (int64_t p0 = 0; p0 < P; p0 += 32) {
      for (int64_t nb0 = 0; nb0 < NB; nb0 += 2) {
        const bool two = nb0 + 1 < NB;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int t = 0; t < 9; ++t) {
          const uint16_t* a = pad + (p0 + (t / 3) * Wp + t % 3) * Mp;
          const uint16_t* k = kb + (t * KC * NB + nb0) * 512;
          for (int64_t kc = 0; kc < KC; ++kc, a += 32, k += NB * 512) {
            _tile_loadd(4, a, a_stride);
            _tile_loadd(5, a + 16 * Mp, a_stride);
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
        // tmp: 32 positions x 32 channels.
        _tile_stored(0, tmp, 128);
        _tile_stored(2, tmp + 16 * 32, 128);
        if (two) {
          _tile_stored(1, tmp + 16, 128);
          _tile_stored(3, tmp + 16 * 32 + 16, 128);
        }
        const int64_t cols = two ? 32 : 16;
        for (int64_t r = 0; r < 32 && p0 + r < P; ++r) {
          const int64_t y = (p0 + r) / Wp, x = (p0 + r) % Wp;
          if (x < W) std::memcpy(dst + (y * W + x) * N + nb0 * 16, tmp + r * 32, sizeof(float) * cols);
        }
      }
    }
  }
  _tile_release();
  return true;
}

// dk[i, j, m, n] = sum over (b, y, x) of bf16(x)[b, y + i - 1, x + j - 1, m] * bf16(g)[b, y, x, n].
bool kernel_grad_amx(const float* xin, const float* g, float* dk, int64_t B, int64_t H, int64_t W, int64_t M,
                     int64_t N) {
  const int64_t Mp = round_up(M, 32), NB = N / 16, Wp = W + 2;
  const int64_t P = H * Wp, P32 = round_up(P, 32);
  const int64_t Q = round_up(P32 + 2 * Wp + 2, 32);  // x^T's row: every padded pixel a tap reads
  uint16_t* xt = scratch_bf16(0, Mp * Q);
  uint16_t* gv = scratch_bf16(1, P32 * N);  // [P32 / 2][N][2]
  float* acc = scratch(2, 9 * Mp * N);
  if (!xt || !gv || !acc) return false;
  std::memset(xt, 0, sizeof(uint16_t) * Mp * Q);
  std::memset(gv, 0, sizeof(uint16_t) * P32 * N);  // border positions (x >= W) and p >= P stay zero
  std::memset(acc, 0, sizeof(float) * 9 * Mp * N);
  configure_tiles();
  for (int64_t b = 0; b < B; ++b) {
    const float* xs = xin + b * H * W * M;
    const float* gs = g + b * H * W * N;
    for (int64_t y = 0; y < H; ++y)
      for (int64_t x = 0; x < W; ++x) {
        const int64_t q = (y + 1) * Wp + x + 1, p = y * Wp + x;
        const float* s = xs + (y * W + x) * M;
        for (int64_t m = 0; m < M; ++m) xt[m * Q + q] = bf16(s[m]);
        const float* gp = gs + (y * W + x) * N;
        uint16_t* d = gv + (p / 2) * N * 2 + p % 2;
        for (int64_t n = 0; n < N; ++n) d[n * 2] = bf16(gp[n]);
      }
    for (int t = 0; t < 9; ++t) {
      const int64_t off = (t / 3) * Wp + t % 3;
      for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
        for (int64_t nb0 = 0; nb0 < NB; nb0 += 2) {
          const bool two = nb0 + 1 < NB;
          float* c = acc + (t * Mp + m0) * N + nb0 * 16;
          const int64_t c_stride = N * 4;
          _tile_loadd(0, c, c_stride);
          _tile_loadd(2, c + 16 * N, c_stride);
          if (two) {
            _tile_loadd(1, c + 16, c_stride);
            _tile_loadd(3, c + 16 * N + 16, c_stride);
          }
          const uint16_t* a = xt + m0 * Q + off;
          const uint16_t* v = gv + nb0 * 32;
          for (int64_t p0 = 0; p0 < P32; p0 += 32, a += 32, v += 16 * N * 2) {
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
  _tile_release();
  for (int t = 0; t < 9; ++t) std::memcpy(dk + t * M * N, acc + t * Mp * N, sizeof(float) * M * N);
  return true;
}

ffi::Error unavailable() {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                    "synth_med AMX kernels: the OS did not grant this process the AMX tile state");
}

ffi::Error Conv3x3AmxImpl(ffi::Buffer<ffi::F32> in, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> out,
                          bool flip) {
  auto di = in.dimensions(), dk = kernel.dimensions(), dout = out->dimensions();
  if (di.size() != 4 || dk.size() != 4 || dk[0] != 3 || dk[1] != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3_bf16: input must be NHWC and the kernel (3, 3, ., .)");
  const int64_t M = di[3], N = flip ? dk[2] : dk[3];
  if ((flip ? dk[3] : dk[2]) != M)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3_bf16: kernel channels do not match the input's");
  if (dout.size() != 4 || dout[0] != di[0] || dout[1] != di[1] || dout[2] != di[2] || dout[3] != N)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3_bf16: result must be (b, h, w, output channels)");
  if (N % 16 != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3_bf16: output channels must be a multiple of 16");
  if (!amx_permitted()) return unavailable();
  if (!conv3x3_amx(in.typed_data(), kernel.typed_data(), out->typed_data(), di[0], di[1], di[2], M, N, flip))
    return out_of_memory();
  return ffi::Error::Success();
}

ffi::Error KernelGradAmxImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g, ffi::ResultBuffer<ffi::F32> dk) {
  auto dx = x.dimensions(), dg = g.dimensions(), dd = dk->dimensions();
  if (dx.size() != 4 || dg.size() != 4 || dx[0] != dg[0] || dx[1] != dg[1] || dx[2] != dg[2])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "kernel_grad_bf16: operands must be NHWC of one shape but channels");
  if (dd.size() != 4 || dd[0] != 3 || dd[1] != 3 || dd[2] != dx[3] || dd[3] != dg[3])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "kernel_grad_bf16: result must be (3, 3, channels of x, channels of g)");
  if (dg[3] % 16 != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "kernel_grad_bf16: g's channels must be a multiple of 16");
  if (!amx_permitted()) return unavailable();
  if (!kernel_grad_amx(x.typed_data(), g.typed_data(), dk->typed_data(), dx[0], dx[1], dx[2], dx[3], dg[3]))
    return out_of_memory();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedConv3x3Bf16, Conv3x3AmxImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("flip"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedKernelGradBf16, KernelGradAmxImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// 1 when the AMX kernels are compiled in and the OS grants this process the tile state.
extern "C" int synth_med_amx_available() { return amx_permitted() ? 1 : 0; }

#else

extern "C" int synth_med_amx_available() { return 0; }

#endif
