// The one matrix product the CPU attention kernels need, in "broadcast-A" form:
//
//   C[M x N] = alpha * A * B + beta * C,   A(r, p) = a[r * a_rs + p * a_ps],
//   B row-major [K x N] with row stride ldb, C row-major with row stride ldc.
//
// split_k: reduce along K in 8 interleaved accumulator chains, summed pairwise at the
// end, instead of one. The score products (Q K^T, dO V^T) pass it when the tile has fewer
// than 16 keys: torch's sgemm then reduces along K in vector lanes, and one chain over
// D = 64 steps left our fp32 out error at 1.21x torch's pooled RMS (up to 5.2x on single
// cases) with large logits; 8 chains give 0.63x (tests/test_accuracy_extreme.py). Only
// there: with 3 rows per tile instead of 14 it made D = 16 attention 1.5x slower.
//
// A is read one scalar at a time (broadcast), so it may be a matrix or the transpose of
// one (a_rs = 1): every product of the forward and backward passes (Q K^T with K^T packed,
// P V, dO V^T with V^T packed, P^T dO, dS^T Q, dS K) is this one shape with B's columns
// contiguous. beta is 0 (overwrite) or 1 (accumulate).
//
// float: an AVX-512 register-blocked micro-kernel (gemm_avx512.cpp) on the avx512 and
// avx512_bf16 paths of cpu_isa() (isa.h: the CPU, torch's capability and
// RING_ATTN_CPU_ISA decide); otherwise its AVX2/FMA twin (gemm_avx2.cpp, the build's
// baseline ISA). double takes the BLAS that libtorch_cpu
// carries (blas.h): float64 is for checking, not speed.
#pragma once
#include <cstdint>

namespace ring_attn::cpu {

// cpu_isa() >= avx512: the AVX-512 kernels run (decided once, isa.h).
bool use_avx512();

void gemm_bcast(int64_t M, int64_t N, int64_t K, float alpha, const float* a, int64_t a_rs,
                int64_t a_ps, const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                bool split_k = false);
// (double: the BLAS; split_k is ignored, float64 has accuracy to spare.)
void gemm_bcast(int64_t M, int64_t N, int64_t K, double alpha, const double* a, int64_t a_rs,
                int64_t a_ps, const double* b, int64_t ldb, double beta, double* c,
                int64_t ldc, bool split_k = false);

// The AVX2/FMA micro-kernel (float only).
void gemm_bcast_avx2(int64_t M, int64_t N, int64_t K, float alpha, const float* a,
                     int64_t a_rs, int64_t a_ps, const float* b, int64_t ldb, float beta,
                     float* c, int64_t ldc, bool split_k);

// The AVX-512 micro-kernel (float only); call only when use_avx512().
void gemm_bcast_avx512(int64_t M, int64_t N, int64_t K, float alpha, const float* a,
                       int64_t a_rs, int64_t a_ps, const float* b, int64_t ldb, float beta,
                       float* c, int64_t ldc, bool split_k);

// bfloat16 products (gemm_bf16_avx512.cpp; call only when use_avx512_bf16(), i.e.
// cpu_isa() == avx512_bf16): the same
// shape with bf16 pairs along the reduction, K2 = number of pairs, float32 C.
bool use_avx512_bf16();
void gemm_bcast_bf16_avx512(int64_t M, int64_t N, int64_t K2, float alpha, const uint32_t* a,
                            int64_t a_rs, int64_t a_ps, const uint32_t* b, int64_t ldb,
                            float beta, float* c, int64_t ldc);
// dst[r][0..n) = bf16(src[r][0..n)) rounded to nearest even, and dst[r][n] = 0 when n is odd.
void to_bf16_rows_avx512(const float* src, int64_t m, int64_t n, int64_t lds, uint16_t* dst,
                         int64_t ldd);
// Pairs of rows interleaved: dst[i2][c] = bf16(src[2*i2][c]) | bf16(src[2*i2+1][c]) << 16
// for i2 < ceil(m / 2), c < n (the row after an odd last one reads as 0): the transposed A
// operand (a_rs = 1, a_ps = ldd) of a product that reduces over src's rows.
void to_bf16_row_pairs_avx512(const float* src, int64_t m, int64_t n, int64_t lds,
                              uint32_t* dst, int64_t ldd);

}  // namespace ring_attn::cpu
