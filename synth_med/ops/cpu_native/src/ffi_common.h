// Helpers shared by the custom calls: a dense layer's positions, and the common binding.
#pragma once
#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace synth_med {

// Positions (the product of every axis but the last) when a and v agree on them, else -1.
inline int64_t positions(xla::ffi::Span<const int64_t> da, xla::ffi::Span<const int64_t> dv) {
  if (da.size() < 2 || da.size() != dv.size()) return -1;
  int64_t P = 1;
  for (size_t i = 0; i + 1 < da.size(); ++i) {
    if (da[i] != dv[i]) return -1;
    P *= da[i];
  }
  return P;
}

// The binding of a handler taking two float32 buffers and returning one (the caller adds its
// attributes): the convolutions, dense layers and their gradients.
inline auto two_buffers_to_one() {
  using xla::ffi::Buffer;
  using xla::ffi::F32;
  return xla::ffi::Ffi::Bind().Arg<Buffer<F32>>().Arg<Buffer<F32>>().Ret<Buffer<F32>>();
}

}  // namespace synth_med
