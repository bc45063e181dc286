// A 3x3 'SAME', stride-1 convolution (NHWC activations, HWIO kernel) as an XLA FFI custom call
// for the CPU, built on first use by `synth_med.ops.cpu_native.kernels`. It serves both the forward
// convolution and its input gradient:
//
//   out[b, y, x, n] = sum over (i, j, m) of in[b, y + i - 1, x + j - 1, m] * K[i, j, m, n]
//
// with `in` zero outside the image. With `flip` the kernel operand is the forward kernel
// (3, 3, N, M) and K[i, j, m, n] = kernel[2 - i, 2 - j, n, m]: the input gradient of a
// convolution with that kernel, given the output gradient as `in`.
//
// Each image is copied once into a zero-bordered scratch (in cache), so every tap of a run of
// MR output pixels reads MR rows of one stride; a tile of MR pixels x 32 output channels is then
// accumulated in registers over the 9 taps x M input channels (an outer product per step, the
// micro-kernel of outer_product.h).
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "ffi_common.h"
#include "outer_product.h"
#include "scratch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace synth_med;

namespace {

// False when its scratch cannot be had.
bool conv3x3(const float* in, const float* kernel, float* out, int64_t B, int64_t H, int64_t W, int64_t M,
             int64_t N, bool flip) {
  // The kernel as [tap][m][n], n contiguous.
  const float* k = kernel;
  if (flip) {
    float* kt = scratch(0, 9 * M * N);
    if (!kt) return false;
    for (int t = 0; t < 9; ++t) transpose(kernel + (8 - t) * N * M, N, M, M, kt + t * M * N);
    k = kt;
  }
  const int64_t Wp = W + 2;
  float* pad = scratch(1, (H + 2) * Wp * M);
  if (!pad) return false;
  std::memset(pad, 0, sizeof(float) * (H + 2) * Wp * M);  // the border stays zero
  Segment segs[9];
  for (int64_t b = 0; b < B; ++b) {
    const float* src = in + b * H * W * M;
    for (int64_t y = 0; y < H; ++y)
      std::memcpy(pad + ((y + 1) * Wp + 1) * M, src + y * W * M, sizeof(float) * W * M);
    float* dst = out + b * H * W * N;
    for (int64_t y = 0; y < H; ++y) {
      for (int64_t x0 = 0; x0 < W; x0 += MR) {
        const int rows = int(std::min<int64_t>(MR, W - x0));
        for (int i = 0; i < 3; ++i)
          for (int j = 0; j < 3; ++j)
            segs[i * 3 + j] = Segment{pad + ((y + i) * Wp + x0 + j) * M, k + (i * 3 + j) * M * N, M};
        float* c = dst + (y * W + x0) * N;
        int64_t n = 0;
        for (; n + 2 * VL <= N; n += 2 * VL) tile_rows<2, false>(rows, segs, 9, 0, n, M, 1, N, c + n, N);
        for (; n < N; n += VL) tile_rows<1, false>(rows, segs, 9, 0, n, M, 1, N, c + n, N);
      }
    }
  }
  return true;
}

ffi::Error Conv3x3Impl(ffi::Buffer<ffi::F32> in, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> out,
                       bool flip) {
  auto di = in.dimensions(), dk = kernel.dimensions(), dout = out->dimensions();
  if (di.size() != 4 || dk.size() != 4 || dk[0] != 3 || dk[1] != 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3: input must be NHWC and the kernel (3, 3, ., .)");
  const int64_t M = di[3], N = flip ? dk[2] : dk[3];
  if ((flip ? dk[3] : dk[2]) != M)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3: kernel channels do not match the input's");
  if (dout.size() != 4 || dout[0] != di[0] || dout[1] != di[1] || dout[2] != di[2] || dout[3] != N)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3: result must be (b, h, w, output channels)");
  if (N % VL != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "conv3x3: output channels must be a multiple of the SIMD width");
  if (!conv3x3(in.typed_data(), kernel.typed_data(), out->typed_data(), di[0], di[1], di[2], M, N, flip))
    return out_of_memory();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedConv3x3, Conv3x3Impl,
                              two_buffers_to_one().Attr<bool>("flip"));
