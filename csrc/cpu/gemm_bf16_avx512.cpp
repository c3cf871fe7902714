// bfloat16 dot-product micro-kernel (AVX512-BF16 vdpbf16ps) for the forward and backward
// products of bfloat16 inputs, and the float32 -> bf16 pair conversions that feed it;
// entered only when use_avx512_bf16() (gemm.h).
//
// vdpbf16ps multiplies 16 lanes of bf16 *pairs* and adds both products into float32
// lanes: twice the multiply-adds of a float32 FMA per instruction, with float32
// accumulation. Operands therefore hold pairs along the reduction dimension:
//   A2(r, p2) = a[r * a_rs + p2 * a_ps]  (a uint32 = bf16 elements 2*p2, 2*p2+1 of row r)
//   B2 row p2 = N uint32 pairs (elements 2*p2, 2*p2+1 of column c), row stride ldb.
// Register blocking, masking and loop order as in gemm_avx512.cpp.
//
// As there, every header comes before the target pragma.
#include <immintrin.h>

#include <cstdint>

#include "cpu/gemm.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")

namespace ring_attn::cpu {
namespace {

template <int MR, int NV>
__attribute__((always_inline)) inline void tile(int64_t K2, const uint32_t* a, int64_t a_rs,
                                                int64_t a_ps, const uint32_t* b, int64_t ldb,
                                                float* c, int64_t ldc, float alpha,
                                                float beta, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < K2; ++p) {
    const uint32_t* bp = b + p * ldb;
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512i x = v == NV - 1 ? _mm512_maskz_loadu_epi32(last, bp + 16 * v)
                                    : _mm512_loadu_si512(bp + 16 * v);
      bv[v] = (__m512bh)x;
    }
    const uint32_t* ap = a + p * a_ps;
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(static_cast<int>(ap[r * a_rs]));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      float* cp = c + r * ldc + 16 * v;
      __m512 res = _mm512_mul_ps(acc[r][v], va);
      if (beta != 0.f) res = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(mk, cp), res);
      _mm512_mask_storeu_ps(cp, mk, res);
    }
  }
}

template <int NV, int MR>
inline void rows_tail(int64_t rem, int64_t K2, const uint32_t* a, int64_t a_rs, int64_t a_ps,
                      const uint32_t* b, int64_t ldb, float* c, int64_t ldc, float alpha,
                      float beta, __mmask16 last) {
  if constexpr (MR > 0) {
    if (rem == MR) {
      tile<MR, NV>(K2, a, a_rs, a_ps, b, ldb, c, ldc, alpha, beta, last);
    } else {
      rows_tail<NV, MR - 1>(rem, K2, a, a_rs, a_ps, b, ldb, c, ldc, alpha, beta, last);
    }
  }
}

template <int NV, int MR>
void rows(int64_t M, int64_t K2, const uint32_t* a, int64_t a_rs, int64_t a_ps,
          const uint32_t* b, int64_t ldb, float* c, int64_t ldc, float alpha, float beta,
          __mmask16 last) {
  int64_t r0 = 0;
  for (; r0 + MR <= M; r0 += MR)
    tile<MR, NV>(K2, a + r0 * a_rs, a_rs, a_ps, b, ldb, c + r0 * ldc, ldc, alpha, beta, last);
  if (r0 < M)
    rows_tail<NV, MR - 1>(M - r0, K2, a + r0 * a_rs, a_rs, a_ps, b, ldb, c + r0 * ldc, ldc,
                          alpha, beta, last);
}

}  // namespace

void gemm_bcast_bf16_avx512(int64_t M, int64_t N, int64_t K2, float alpha, const uint32_t* a,
                            int64_t a_rs, int64_t a_ps, const uint32_t* b, int64_t ldb,
                            float beta, float* c, int64_t ldc) {
  for (int64_t c0 = 0; c0 < N; c0 += 64) {
    const int64_t nc = N - c0 < 64 ? N - c0 : 64;
    const int nv = static_cast<int>((nc + 15) / 16);
    const int tail = static_cast<int>(nc - 16 * (nv - 1));
    const __mmask16 last = tail == 16 ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
    const uint32_t* bc = b + c0;
    float* cc = c + c0;
    switch (nv) {
      case 4: rows<4, 6>(M, K2, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, last); break;
      case 3: rows<3, 8>(M, K2, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, last); break;
      case 2: rows<2, 12>(M, K2, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, last); break;
      default: rows<1, 14>(M, K2, a, a_rs, a_ps, bc, ldb, cc, ldc, alpha, beta, last); break;
    }
  }
}

void to_bf16_rows_avx512(const float* src, int64_t m, int64_t n, int64_t lds, uint16_t* dst,
                         int64_t ldd) {
  const int64_t n2 = (n + 1) & ~int64_t(1);  // even width: the pad column is written as 0
  for (int64_t r = 0; r < m; ++r) {
    const float* s = src + r * lds;
    uint16_t* d = dst + r * ldd;
    for (int64_t c = 0; c < n2; c += 16) {
      const int64_t left = n - c;
      const __mmask16 k = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0)
                                                                      : __mmask16((1u << left) - 1);
      const int64_t wleft = n2 - c;
      const __mmask16 wk = wleft >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << wleft) - 1);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, s + c));
      _mm256_mask_storeu_epi16(d + c, wk, (__m256i)h);
    }
  }
}

namespace {
// bf16(x) rounded to nearest even, in the low 16 bits of each 32-bit lane.
inline __m512i widened_bf16(__m512 x) {
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x));
}
}  // namespace

void to_bf16_row_pairs_avx512(const float* src, int64_t m, int64_t n, int64_t lds,
                              uint32_t* dst, int64_t ldd) {
  for (int64_t i2 = 0; 2 * i2 < m; ++i2) {
    const float* s0 = src + 2 * i2 * lds;
    const float* s1 = s0 + lds;
    const bool has1 = 2 * i2 + 1 < m;
    uint32_t* d = dst + i2 * ldd;
    for (int64_t c = 0; c < n; c += 16) {
      const __mmask16 k = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1);
      // bf16 of each row widened to the low half of 32-bit lanes, the second row shifted up.
      const __m512i lo = widened_bf16(_mm512_maskz_loadu_ps(k, s0 + c));
      const __m512i hi = has1 ? widened_bf16(_mm512_maskz_loadu_ps(k, s1 + c))
                              : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(d + c, k, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
    }
  }
}

}  // namespace ring_attn::cpu
