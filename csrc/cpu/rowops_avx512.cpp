// AVX-512 row operations of the softmax (see rowops.h). 16 lanes instead of the 8 of the
// AVX2 baseline: on the EPYC this was tuned on, exp and the max/sum passes are the largest
// cost of a tile after the two matrix products.
//
// exp: x = n ln2 + r with n = round(x log2 e) and |r| <= ln2 / 2, exp(r) by its degree-6
// Taylor polynomial (truncation error r^7 / 7! < 1.3e-7, about one float ulp), then
// scaled by 2^n with vscalefps. Inputs below -87 (exp < 1.7e-38, far below anything a
// row sum >= 1 can register) give exactly 0, so masked scores (-inf) give P = 0; NaN
// gives NaN (torch's math backend propagates it).
//
// As in gemm_avx512.cpp, headers come before the target pragma so no shared inline
// function is emitted with AVX-512 code.
#include <immintrin.h>

#include <cstdint>

#include "cpu/rowops.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace ring_attn::cpu {
namespace {

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

inline __m512 exp16(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693145751953125f);
  const __m512 ln2_lo = _mm512_set1_ps(1.428606765330187e-06f);
  // Unordered compare and max(-87, x) (vmaxps returns its second operand when either is
  // NaN) keep a NaN input NaN through to the result.
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_NLT_UQ);
  x = _mm512_max_ps(_mm512_set1_ps(-87.f), x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

}  // namespace

// NaN if any element is NaN: vmaxps drops NaN in one operand, so NaN lanes are tracked
// in a mask register beside the max (one compare per 16 elements).
float row_max_avx512(const float* x, int64_t n) {
  __m512 m = _mm512_set1_ps(-__builtin_inff());
  __mmask16 nan = 0;
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = tail_mask(n - c);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + c);
    m = _mm512_mask_max_ps(m, k, m, v);
    nan |= _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q);
  }
  return nan ? __builtin_nanf("") : _mm512_reduce_max_ps(m);
}

float exp_row_sum_avx512(float* x, int64_t n, float shift, float lo) {
  const __m512 s = _mm512_set1_ps(shift), l = _mm512_set1_ps(lo);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {  // two independent chains hide the polynomial latency
    const __m512 e0 = exp16(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + c), s), l));
    const __m512 e1 = exp16(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + c + 16), s), l));
    _mm512_storeu_ps(x + c, e0);
    _mm512_storeu_ps(x + c + 16, e1);
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
  }
  for (; c < n; c += 16) {
    const __mmask16 k = tail_mask(n - c);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + c), s), l));
    _mm512_mask_storeu_ps(x + c, k, e);
    acc0 = _mm512_add_ps(acc0, _mm512_maskz_mov_ps(k, e));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

void scale_row_avx512(float* x, int64_t n, float a) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = tail_mask(n - c);
    _mm512_mask_storeu_ps(x + c, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + c), va));
  }
}

void ds_row_avx512(const float* P, float* dP, int64_t n, float delta) {
  const __m512 vd = _mm512_set1_ps(delta);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 k = tail_mask(n - c);
    const __m512 d = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dP + c), vd);
    _mm512_mask_storeu_ps(dP + c, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, P + c), d));
  }
}

}  // namespace ring_attn::cpu
