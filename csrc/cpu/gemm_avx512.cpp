// AVX-512 micro-kernel of gemm_bcast (float), entered only when use_avx512() (gemm.cpp).
//
// Why our own kernel rather than the BLAS: the attention products are small (64 x 512 x
// 64 and the like) and issued tens of thousands of times per call; libtorch's MKL on this
// AMD EPYC runs its AVX2 path (a 2048^3 sgemm peaks near 135-170 GFLOP/s on 2 cores),
// while Zen 4/5 and Intel server cores execute two 16-wide FMAs per cycle.
//
// Register blocking: C is computed in tiles of MR rows x 16*NV columns held in zmm
// accumulators; for each step p of the reduction the tile loads NV vectors of B's row p
// and broadcasts MR scalars of A's column p (a broadcast load folded into the FMA), so a
// tile of MR*NV FMAs needs NV + MR loads. MR*NV + NV <= 32 registers: NV=4 -> MR=6,
// NV=3 -> MR=8, NV=2 -> MR=12, NV=1 -> MR=14. The last vector of a tile is masked, so
// any N works without padding. Columns advance in chunks of 64 outside the row loop, so
// the K x 64 panel of B stays in L1/L2 while every row block reads it.
//
// Every header is included before the target pragma, so no inline function of a shared
// header is ever emitted with AVX-512 code (the linker could otherwise keep that copy for
// callers in baseline objects); below the pragma only this file's own functions live.
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace ring_attn::cpu {
namespace {

// One step p of the reduction into accumulator set acc.
template <int MR, int NV>
__attribute__((always_inline)) inline void step(__m512 (&acc)[MR][NV], const float* a,
                                                int64_t a_rs, const float* bp,
                                                __mmask16 last) {
  __m512 bv[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v)
    bv[v] = v == NV - 1 ? _mm512_maskz_loadu_ps(last, bp + 16 * v) : _mm512_loadu_ps(bp + 16 * v);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512 av = _mm512_set1_ps(a[r * a_rs]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
  }
}

// CH independent accumulator chains (step p feeds chain p % CH), summed at the end: the
// rounding error of a K-long sum grows like the chain length, so CH chains cut it by
// about sqrt(CH) (split_k in gemm.h).
template <int MR, int NV, int CH>
__attribute__((always_inline)) inline void tile(int64_t K, const float* a, int64_t a_rs,
                                                int64_t a_ps, const float* b, int64_t ldb,
                                                float* c, int64_t ldc, float alpha,
                                                float beta, __mmask16 last) {
  __m512 acc[CH][MR][NV];
#pragma GCC unroll 4
  for (int h = 0; h < CH; ++h)
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[h][r][v] = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + CH <= K; p += CH) {
#pragma GCC unroll 4
    for (int h = 0; h < CH; ++h)
      step<MR, NV>(acc[h], a + (p + h) * a_ps, a_rs, b + (p + h) * ldb, last);
  }
  for (; p < K; ++p) step<MR, NV>(acc[0], a + p * a_ps, a_rs, b + p * ldb, last);
#pragma GCC unroll 4
  for (int w = 1; w < CH; w *= 2)  // pairwise: chain h += chain h + w
#pragma GCC unroll 4
    for (int h = 0; h + w < CH; h += 2 * w)
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[h][r][v] = _mm512_add_ps(acc[h][r][v], acc[h + w][r][v]);
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      float* cp = c + r * ldc + 16 * v;
      __m512 res = _mm512_mul_ps(acc[0][r][v], va);
      if (beta != 0.f) res = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(mk, cp), res);
      _mm512_mask_storeu_ps(cp, mk, res);
    }
  }
}

// Rows [0, M) in blocks of MR, the remainder with a smaller compile-time block.
template <int NV, int MR, int CH>
inline void rows_tail(int64_t rem, int64_t K, const float* a, int64_t a_rs, int64_t a_ps,
                      const float* b, int64_t ldb, float* c, int64_t ldc, float alpha,
                      float beta, __mmask16 last) {
  if constexpr (MR > 0) {
    if (rem == MR) {
      tile<MR, NV, CH>(K, a, a_rs, a_ps, b, ldb, c, ldc, alpha, beta, last);
    } else {
      rows_tail<NV, MR - 1, CH>(rem, K, a, a_rs, a_ps, b, ldb, c, ldc, alpha, beta, last);
    }
  }
}

template <int NV, int MR, int CH = 1>
void rows(int64_t M, int64_t K, const float* a, int64_t a_rs, int64_t a_ps, const float* b,
          int64_t ldb, float* c, int64_t ldc, float alpha, float beta, __mmask16 last) {
  int64_t r0 = 0;
  for (; r0 + MR <= M; r0 += MR)
    tile<MR, NV, CH>(K, a + r0 * a_rs, a_rs, a_ps, b, ldb, c + r0 * ldc, ldc, alpha, beta, last);
  if (r0 < M)
    rows_tail<NV, MR - 1, CH>(M - r0, K, a + r0 * a_rs, a_rs, a_ps, b, ldb, c + r0 * ldc, ldc,
                          alpha, beta, last);
}

}  // namespace

void gemm_bcast_avx512(int64_t M, int64_t N, int64_t K, float alpha, const float* a,
                       int64_t a_rs, int64_t a_ps, const float* b, int64_t ldb, float beta,
                       float* c, int64_t ldc, bool split_k) {
  for (int64_t c0 = 0; c0 < N; c0 += 64) {
    const int64_t nc = N - c0 < 64 ? N - c0 : 64;
    const int nv = static_cast<int>((nc + 15) / 16);
    const int tail = static_cast<int>(nc - 16 * (nv - 1));
    const __mmask16 last = tail == 16 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
    const float* bc = b + c0;
    float* cc = c + c0;
    switch (nv) {
      case 4: rows<4, 6>(M, K, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, last); break;
      case 3: rows<3, 8>(M, K, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, last); break;
      case 2: rows<2, 12>(M, K, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, last); break;
      default:
        if (split_k) {  // 8 chains of 3 rows: 24 accumulators (gemm.h)
          rows<1, 3, 8>(M, K, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, last);
        } else {
          rows<1, 14>(M, K, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, last);
        }
        break;
    }
  }
}

}  // namespace ring_attn::cpu
