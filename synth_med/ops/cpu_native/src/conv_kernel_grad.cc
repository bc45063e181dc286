// Kernel gradient of a 3x3 'SAME', stride-1 convolution (NHWC activations, HWIO kernel)
// as an XLA FFI custom call for the CPU, built on first use by `synth_med.ops.cpu_native.kernels`.
//
//   dk[i, j, m, n] = sum over (b, y, x) of A[b, y + di, x + dj, m] * V[b, y + ei, x + ej, n]
//
// where the shifted operand (A if shift_a, else V) is read at (y + i - 1, x + j - 1) and is
// zero outside the image, and the other one at (y, x). With A = the input x and V = the
// output gradient g (shift_a) it is the kernel gradient itself; with A = g, V = x it is its
// (c, o) transpose, for when o is not a multiple of the SIMD width.
//
// XLA's CPU backend has no direct backward-weights kernel: it lowers this to a convolution
// over the batch, or (synth_med's pure-JAX path) to one matmul over operands built by
// padding and concatenating shifted copies. This reads both operands in place, one image
// row segment at a time, and accumulates a tile of MR x (NV * VL) outputs in registers: an
// outer product per pixel, which is the layout both NHWC operands already have.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ffi_common.h"
#include "outer_product.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using namespace synth_med;

// dk (see the top of this file) for A [B, H, W, M] and V [B, H, W, N], N a multiple of VL.
static void kernel_grad(const float* A, const float* V, float* dk, int64_t B, int64_t H, int64_t W,
                        int64_t M, int64_t N, bool shift_a) {
  std::memset(dk, 0, sizeof(float) * 9 * M * N);
  const int64_t rows = B * H;
  // Rows per chunk: keep a chunk's operands (plus halo) in L2.
  const int64_t row_bytes = W * (M + N) * 4;
  int64_t chunk = std::max<int64_t>(1, (512 * 1024) / std::max<int64_t>(1, row_bytes));
  chunk = std::min(chunk, rows);
  std::vector<Segment> seg_store(chunk);
  Segment* segs = seg_store.data();
  // The unshifted operand is read at (y, x), the shifted one at (y + i - 1, x + j - 1).
  const float* un = shift_a ? V : A;
  const float* sh = shift_a ? A : V;
  const int64_t cu = shift_a ? N : M, cs = shift_a ? M : N;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t r1 = std::min(rows, r0 + chunk);
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) {
        const int64_t x0 = std::max<int64_t>(0, 1 - j), x1 = std::min<int64_t>(W, W + 1 - j);
        int nseg = 0;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / H, y = r % H, ys = y + i - 1;
          if (ys < 0 || ys >= H) continue;
          const float* pu = un + ((b * H + y) * W + x0) * cu;
          const float* ps = sh + ((b * H + ys) * W + x0 + j - 1) * cs;
          segs[nseg++] = shift_a ? Segment{ps, pu, x1 - x0} : Segment{pu, ps, x1 - x0};
        }
        if (!nseg) continue;
        // dk[tap] (M x N) += sum over the segments' pixels of a-row (broadcast) x v-row (vectors).
        tiled_product<true>(M, N, segs, nseg, 1, M, N, dk + (i * 3 + j) * M * N, N);
      }
    }
  }
}

static ffi::Error KernelGradImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> v,
                                 ffi::ResultBuffer<ffi::F32> dk, bool shift_a) {
  auto da = a.dimensions(), dv = v.dimensions();
  if (da.size() != 4 || dv.size() != 4 || da[0] != dv[0] || da[1] != dv[1] || da[2] != dv[2])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "kernel_grad: operands must be NHWC of one shape but channels");
  auto dd = dk->dimensions();
  if (dd.size() != 4 || dd[0] != 3 || dd[1] != 3 || dd[2] != da[3] || dd[3] != dv[3])
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "kernel_grad: result must be (3, 3, channels of a, channels of v)");
  if (dv[3] % VL != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "kernel_grad: vector operand's channels must be a multiple of the SIMD width");
  kernel_grad(a.typed_data(), v.typed_data(), dk->typed_data(), da[0], da[1], da[2], da[3], dv[3], shift_a);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedKernelGrad, KernelGradImpl,
                              two_buffers_to_one().Attr<bool>("shift_a"));

extern "C" int synth_med_simd_width() { return VL; }
