// A dense layer applied at every pixel (a 1x1 convolution), as XLA FFI custom calls for the
// CPU, built on first use by `synth_med.ops.cpu_native.kernels`:
//
//   dense(x [..., M], kernel [M, N]) -> x @ kernel                 [..., N]
//   dense(x [..., M], kernel [N, M], transpose) -> x @ kernel^T    [..., N]  (the input gradient)
//   dense_grad(x [..., M], g [..., N]) -> sum over positions of x^T g   [M, N]  (the kernel gradient)
//
// N must be a multiple of VL. Both operands are read in place in their [positions, channels]
// layout by the register-tiled kernel of outer_product.h; XLA's CPU backend copies one operand
// of the kernel gradient into a transposed [channels, positions] layout first.
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

ffi::Error DenseImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel, ffi::ResultBuffer<ffi::F32> y,
                     bool transpose_kernel) {
  auto dx = x.dimensions(), dk = kernel.dimensions(), dy = y->dimensions();
  const int64_t P = positions(dx, dy);
  if (P < 0 || dk.size() != 2)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dense: x and the result must agree but in their last axis, the kernel be 2-D");
  const int64_t M = dx[dx.size() - 1], N = dy[dy.size() - 1];
  if (dk[0] != (transpose_kernel ? N : M) || dk[1] != (transpose_kernel ? M : N))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dense: the kernel's shape does not match x and the result");
  if (N % VL != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dense: output channels must be a multiple of the SIMD width");
  const float* k = kernel.typed_data();
  if (transpose_kernel) {
    float* kt = scratch(0, M * N);
    if (!kt) return out_of_memory();
    transpose(k, N, M, M, kt);
    k = kt;
  }
  gemm(P, N, M, x.typed_data(), M, 1, k, N, y->typed_data(), N);
  return ffi::Error::Success();
}

// dk[m, n] = sum over rows p of A[p, m] V[p, n], N a multiple of VL: the kernel gradient of a
// dense layer applied at every pixel (a 1x1 convolution), read in place. XLA's CPU backend
// first copies one operand into a transposed [channels, pixels] layout for its matmul.
void dense_grad(const float* A, const float* V, float* dk, int64_t P, int64_t M, int64_t N) {
  std::memset(dk, 0, sizeof(float) * M * N);
  // Rows per chunk: keep a chunk of both operands in L2 while every tile of dk passes over it.
  const int64_t chunk = std::max<int64_t>(1, (512 * 1024) / ((M + N) * 4));
  for (int64_t p0 = 0; p0 < P; p0 += chunk) {
    const Segment seg{A + p0 * M, V + p0 * N, std::min(chunk, P - p0)};
    tiled_product<true>(M, N, &seg, 1, 1, M, N, dk, N);
  }
}

ffi::Error DenseGradImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> dk) {
  auto da = a.dimensions(), dv = v.dimensions();
  const int64_t P = positions(da, dv);
  if (P < 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dense_grad: operands must agree but in their last axis");
  const int64_t M = da[da.size() - 1], N = dv[dv.size() - 1];
  auto dd = dk->dimensions();
  if (dd.size() != 2 || dd[0] != M || dd[1] != N)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dense_grad: result must be (channels of a, channels of v)");
  if (N % VL != 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "dense_grad: v's channels must be a multiple of the SIMD width");
  dense_grad(a.typed_data(), v.typed_data(), dk->typed_data(), P, M, N);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedDense, DenseImpl,
                              two_buffers_to_one().Attr<bool>("transpose_kernel"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SynthMedDenseGrad, DenseGradImpl,
                              two_buffers_to_one());

