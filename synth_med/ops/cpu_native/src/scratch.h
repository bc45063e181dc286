// A thread's reusable, 64-byte-aligned scratch buffers for the native kernels. Each XLA CPU
// device runs its thunks on one thread, so a buffer per (thread, slot) is never shared. Reusing
// them avoids a page fault per call and per new page, and the alignment keeps every vector load
// and store of a row whose length is a SIMD multiple within one cache line (a std::vector's
// 16-byte alignment splits every other 64-byte access in two).
#pragma once
#include <cstdint>
#include <cstdlib>

#include "xla/ffi/api/ffi.h"

namespace synth_med {

constexpr int kScratchSlots = 6;

// At least n floats in slot `slot` (< kScratchSlots) of this thread; the contents are undefined.
// nullptr when the memory cannot be had (the caller returns `out_of_memory()`).
inline float* scratch(int slot, int64_t n) {
  struct Buf {
    float* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[kScratchSlots];
  Buf& b = bufs[slot];
  if (b.n < n) {
    std::free(b.p);
    b.p = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
    b.n = b.p ? n : 0;
  }
  return b.p;
}

inline xla::ffi::Error out_of_memory() {
  return xla::ffi::Error(xla::ffi::ErrorCode::kResourceExhausted, "synth_med native kernel: out of memory for its scratch");
}

}  // namespace synth_med
