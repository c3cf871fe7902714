// AVX2/FMA micro-kernel of gemm_bcast (float), the avx2 path of cpu_isa() (cpu_isa.h):
// CPUs without AVX-512, ATEN_CPU_CAPABILITY=avx2 or RING_ATTN_CPU_ISA=avx2. Same scheme
// as gemm_avx512.cpp with 8-wide vectors and 16 registers: tiles of 6 rows x 16 columns
// (12 accumulators + 2 B vectors + 1 broadcast), the standard AVX2 sgemm blocking; only
// column tails use vmaskmovps.
//
// Why not the BLAS here too: on the 2-core EPYC with ATEN_CPU_CAPABILITY=avx2, forward+
// backward at S=4096, D=64 ran at 71 GFLOP/s through MKL's sgemm (small products pay its
// per-call overhead) against 76 for torch's own kernel; see the benchmark notes in
// attention_fwd.cpp for how these were measured.
//
// Why not oneDNN's brgemm (at::native::cpublas::brgemm, exported by libtorch_cpu; torch's
// own flash kernel uses it for reduced precision): capped at AVX2 (ONEDNN_MAX_CPU_ISA=AVX2)
// it ran the attention shapes at 75-114 GFLOP/s against 81-111 for this kernel and 90-98
// for MKL's sgemm (one thread, thread CPU time, M x N x K in {64x512x64, 64x64x512,
// 64x128x64, 128x64x64, 64x64x128, 64x512x128, 64x128x512}, on the shared 2-core EPYC):
// no faster, and an ATen-internal API.
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm.h"

namespace ring_attn::cpu {
namespace {

inline __m256i lane_mask(int64_t left) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left < 8 ? left : 8)), idx);
}

// One step p of the reduction into accumulator set acc.
template <int MR, int NV, bool kTail>
__attribute__((always_inline)) inline void step(__m256 (&acc)[MR][NV], const float* a,
                                                int64_t a_rs, const float* bp, __m256i last) {
  __m256 bv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v)
    bv[v] = kTail && v == NV - 1 ? _mm256_maskload_ps(bp + 8 * v, last) : _mm256_loadu_ps(bp + 8 * v);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m256 av = _mm256_broadcast_ss(a + r * a_rs);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
  }
}

// CH accumulator chains, summed pairwise at the end (as in gemm_avx512.cpp).
template <int MR, int NV, int CH, bool kTail>
__attribute__((always_inline)) inline void tile(int64_t K, const float* a, int64_t a_rs,
                                                int64_t a_ps, const float* b, int64_t ldb,
                                                float* c, int64_t ldc, float alpha,
                                                float beta, __m256i last) {
  __m256 acc[CH][MR][NV];
#pragma GCC unroll 8
  for (int h = 0; h < CH; ++h)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[h][r][v] = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + CH <= K; p += CH) {
#pragma GCC unroll 8
    for (int h = 0; h < CH; ++h)
      step<MR, NV, kTail>(acc[h], a + (p + h) * a_ps, a_rs, b + (p + h) * ldb, last);
  }
  for (; p < K; ++p) step<MR, NV, kTail>(acc[0], a + p * a_ps, a_rs, b + p * ldb, last);
#pragma GCC unroll 4
  for (int w = 1; w < CH; w *= 2)
#pragma GCC unroll 8
    for (int h = 0; h + w < CH; h += 2 * w)
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[h][r][v] = _mm256_add_ps(acc[h][r][v], acc[h + w][r][v]);
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      float* cp = c + r * ldc + 8 * v;
      __m256 res = _mm256_mul_ps(acc[0][r][v], va);
      if (kTail && v == NV - 1) {
        if (beta != 0.f) res = _mm256_fmadd_ps(_mm256_set1_ps(beta), _mm256_maskload_ps(cp, last), res);
        _mm256_maskstore_ps(cp, last, res);
      } else {
        if (beta != 0.f) res = _mm256_fmadd_ps(_mm256_set1_ps(beta), _mm256_loadu_ps(cp), res);
        _mm256_storeu_ps(cp, res);
      }
    }
  }
}

template <int NV, int MR, int CH, bool kTail>
inline void rows_tail(int64_t rem, int64_t K, const float* a, int64_t a_rs, int64_t a_ps,
                      const float* b, int64_t ldb, float* c, int64_t ldc, float alpha,
                      float beta, __m256i last) {
  if constexpr (MR > 0) {
    if (rem == MR) {
      tile<MR, NV, CH, kTail>(K, a, a_rs, a_ps, b, ldb, c, ldc, alpha, beta, last);
    } else {
      rows_tail<NV, MR - 1, CH, kTail>(rem, K, a, a_rs, a_ps, b, ldb, c, ldc, alpha, beta, last);
    }
  }
}

template <int NV, int MR, int CH, bool kTail>
void rows_of(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_ps, const float* b,
          int64_t ldb, float* c, int64_t ldc, float alpha, float beta, __m256i last) {
  int64_t r0 = 0;
  for (; r0 + MR <= M; r0 += MR)
    tile<MR, NV, CH, kTail>(K, a + r0 * a_rs, a_rs, a_ps, b, ldb, c + r0 * ldc, ldc, alpha, beta, last);
  if (r0 < M)
    rows_tail<NV, MR - 1, CH, kTail>(M - r0, K, a + r0 * a_rs, a_rs, a_ps, b, ldb, c + r0 * ldc, ldc,
                          alpha, beta, last);
}

// Full-width column chunks take plain loads and stores: vmaskmovps stores are microcoded
// on AMD Zen (a dozen cycles each), and a 6 x 16 tile with K = 64 stores 12 vectors
// against 384 cycles of FMAs.
template <int NV, int MR, int CH = 1>
void rows(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_ps, const float* b,
          int64_t ldb, float* c, int64_t ldc, float alpha, float beta, int64_t nc) {
  if (nc == 8 * NV) {
    rows_of<NV, MR, CH, false>(M, K, a, a_rs, a_ps, b, ldb, c, ldc, alpha, beta, __m256i{});
  } else {
    rows_of<NV, MR, CH, true>(M, K, a, a_rs, a_ps, b, ldb, c, ldc, alpha, beta,
                              lane_mask(nc - 8 * (NV - 1)));
  }
}

}  // namespace

void gemm_bcast_avx2(int64_t M, int64_t N, int64_t K, float alpha, const float* a,
                     int64_t a_rs, int64_t a_ps, const float* b, int64_t ldb, float beta,
                     float* c, int64_t ldc, bool split_k) {
  for (int64_t c0 = 0; c0 < N; c0 += 16) {
    const int64_t nc = N - c0 < 16 ? N - c0 : 16;
    const float* bc = b + c0;
    float* cc = c + c0;
    if (split_k) {  // accumulator chains along K (gemm.h)
      if (nc > 8) {
        rows<2, 1, 4>(M, K, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, nc);
      } else {
        rows<1, 1, 8>(M, K, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, nc);
      }
    } else if (nc > 8) {
      rows<2, 6>(M, K, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, nc);
    } else {
      rows<1, 12>(M, K, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, nc);
    }
  }
}

}  // namespace ring_attn::cpu
