// Shape helper shared by the dense-layer custom calls (dense.cc, amx_products.cc).
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

}  // namespace synth_med
