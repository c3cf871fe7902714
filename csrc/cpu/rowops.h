// AVX-512 versions of the per-row element-wise steps of the attention kernels (float
// only), defined in rowops_avx512.cpp and entered only when use_avx512() (gemm.h). The
// portable versions, on at::vec::Vectorized (AVX2 in the baseline objects), are in
// tile.h, which picks between the two.
#pragma once
#include <cstdint>

namespace ring_attn::cpu {

// NaN if any x[c] is NaN.
float row_max_avx512(const float* x, int64_t n);
// x[c] = exp((x[c] - shift) - lo) (exactly 0 where the argument is < -87, NaN where it
// is NaN); returns the row sum. lo: see exp_row_sum in tile.h.
float exp_row_sum_avx512(float* x, int64_t n, float shift, float lo);
void scale_row_avx512(float* x, int64_t n, float a);
// dP[c] = P[c] * (dP[c] - delta)
void ds_row_avx512(const float* P, float* dP, int64_t n, float delta);

}  // namespace ring_attn::cpu
