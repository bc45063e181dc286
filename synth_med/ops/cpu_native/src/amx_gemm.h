// A small matrix product with bfloat16 products and float32 sums on AMX tiles, for kernels in
// other files (attention's six products). Defined in amx_products.cc.
#pragma once
#include <cstdint>

namespace synth_med {

// C = A B (M x Nc, sum over K) with each operand rounded to bfloat16 as it is packed, where
// A[m][k] = a[m * a_rs + k * a_ks] and B[k][n] = b[k * b_ks + n * b_ns]. C[m][n] is written
// to c[m * ldc + n], or with `c_transposed` to c[n * ldc + m]. M and Nc must be multiples of
// 16; K is any. Returns false, computing nothing, where AMX is not compiled in or granted, or
// the scratch cannot be had: the caller then uses its float32 kernel.
bool amx_gemm(int64_t M, int64_t Nc, int64_t K, const float* a, int64_t a_rs, int64_t a_ks, const float* b,
              int64_t b_ks, int64_t b_ns, float* c, int64_t ldc, bool c_transposed = false);

}  // namespace synth_med
