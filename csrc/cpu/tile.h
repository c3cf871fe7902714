// Tile-level helpers shared by the CPU forward and backward kernels: global positions,
// per-tile mask classification, masking and dropout of a score tile, vectorised row
// reductions, and loading a (strided, possibly reduced-precision) block into the
// accumulation type.
#pragma once
#include "cpu/isa.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/attn_params.h"
#include "common/dropout_rng.h"
#include "common/visibility.h"
#include "cpu/gemm.h"
#include "cpu/rowops.h"

namespace ring_attn::cpu {

template <typename scalar_t>
struct AccType { using type = float; };
template <>
struct AccType<double> { using type = double; };
template <typename scalar_t>
using acc_t = typename AccType<scalar_t>::type;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Global positions (and documents) of one side, queries or keys, and their min/max over
// each block, so a tile's status (common/visibility.h) is decided from eight numbers even
// for zigzag/striped maps and packed documents.
struct BlockPositions {
  std::vector<int64_t> pos, bmin, bmax;
  std::vector<int32_t> doc;          // empty without documents
  std::vector<int64_t> dmin, dmax;
  void init(const int64_t* map, int64_t offset, const int32_t* docs, int64_t len,
            int64_t block) {
    pos.resize(len);
    for (int64_t i = 0; i < len; ++i) pos[i] = map ? map[i] : offset + i;
    const int64_t nb = ceil_div(len, block);
    bmin.assign(nb, std::numeric_limits<int64_t>::max());
    bmax.assign(nb, std::numeric_limits<int64_t>::min());
    for (int64_t i = 0; i < len; ++i) {
      bmin[i / block] = std::min(bmin[i / block], pos[i]);
      bmax[i / block] = std::max(bmax[i / block], pos[i]);
    }
    doc.clear();
    if (docs == nullptr) return;
    doc.assign(docs, docs + len);
    dmin.assign(nb, std::numeric_limits<int64_t>::max());
    dmax.assign(nb, std::numeric_limits<int64_t>::min());
    for (int64_t i = 0; i < len; ++i) {
      dmin[i / block] = std::min<int64_t>(dmin[i / block], doc[i]);
      dmax[i / block] = std::max<int64_t>(dmax[i / block], doc[i]);
    }
  }
  Span span(int64_t blk) const { return {bmin[blk], bmax[blk]}; }
  Span doc_span(int64_t blk) const { return doc.empty() ? Span{0, 0} : Span{dmin[blk], dmax[blk]}; }
  int32_t doc_at(int64_t i) const { return doc.empty() ? 0 : doc[i]; }
};

// The status of the tile (query block qb, key block kb) under the band and documents
// (common/visibility.h); a tile with nothing visible is computed masked in full
// (kPartial) when !may_skip.
inline TileKind tile_kind(const AttnMaskParams& mp, const BlockPositions& qp, int64_t qb,
                          const BlockPositions& kp, int64_t kb, bool may_skip) {
  if (!has_visibility_rule(mp)) return TileKind::kFull;
  const TileKind k = classify_tile(mp, qp.span(qb), kp.span(kb), qp.doc_span(qb), kp.doc_span(kb));
  return k == TileKind::kSkip && !may_skip ? TileKind::kPartial : k;
}

// Applies the attention mask and, on a partial tile, the band and documents
// (common/visibility.h) to a score tile S[m x n] (row stride ldS) whose rows are queries
// i0.. and columns keys j0.. of (batch b, query head h). T is the
// accumulation type, the type a float mask is stored in. Masking adds -inf rather than
// overwriting, as torch's math backend does, so a NaN or +inf score at a masked position
// stays NaN (for finite scores the two are identical).
template <typename T>
void mask_tile(T* S, int64_t ldS, int64_t m, int64_t n, const AttnMaskParams& mp, int64_t b,
               int64_t h, int64_t i0, int64_t j0, const BlockPositions& qp,
               const BlockPositions& kp, bool partial) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  if (mp.kind != MaskKind::kNone) {
    const int64_t base = b * mp.stride[0] + h * mp.stride[1];
    const int64_t sj = mp.stride[3];
    for (int64_t r = 0; r < m; ++r) {
      T* row = S + r * ldS;
      const int64_t off = base + (i0 + r) * mp.stride[2] + j0 * sj;
      if (mp.kind == MaskKind::kBool) {
        const uint8_t* mrow = static_cast<const uint8_t*>(mp.ptr) + off;
        for (int64_t c = 0; c < n; ++c) row[c] += mrow[c * sj] ? T(0) : kNegInf;
      } else {
        // A float mask is stored in the accumulation type T (attn_host.cpp converts it).
        const T* mrow = static_cast<const T*>(mp.ptr) + off;
        for (int64_t c = 0; c < n; ++c) row[c] += mrow[c * sj];
      }
    }
  }
  if (partial) {
    for (int64_t r = 0; r < m; ++r) {
      T* row = S + r * ldS;
      const int64_t q = qp.pos[i0 + r];
      const int32_t qd = qp.doc_at(i0 + r);
      for (int64_t c = 0; c < n; ++c) {
        row[c] += visible(mp, q, kp.pos[j0 + c], qd, kp.doc_at(j0 + c)) ? T(0) : kNegInf;
      }
    }
  }
}

// Soft-capping of a scaled score tile S[m x n] (row stride ld), before the mask
// (attn_params.h): S = cap * tanh(S / cap). When dT is given (the backward), also
// dT = 1 - tanh^2 (same layout), the factor dS is multiplied by to reach the raw score.
// tanh keeps NaN and maps +-inf to +-1, as the same formula in torch does. Sleef's tanh
// (at::vec, 1 ulp) in the vector body, std::tanh in the tail.
template <typename T>
void softcap_tile(T* S, T* dT, int64_t ld, int64_t m, int64_t n, T cap) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const T inv = T(1) / cap;
  const Vec vcap(cap), vinv(inv), one(T(1));
  for (int64_t r = 0; r < m; ++r) {
    T* row = S + r * ld;
    T* drow = dT ? dT + r * ld : nullptr;
    int64_t c = 0;
    for (; c + W <= n; c += W) {
      const Vec t = (Vec::loadu(row + c) * vinv).tanh();
      (t * vcap).store(row + c);
      if (drow) (one - t * t).store(drow + c);
    }
    for (; c < n; ++c) {
      const T t = std::tanh(row[c] * inv);
      row[c] = cap * t;
      if (drow) drow[c] = T(1) - t * t;
    }
  }
}

// Dropout of a probability tile P[m x n] (row stride ld for every tile here): with
// z = keep(r, c) / (1 - p), writes P * z into Pd (or into P itself when Pd is null) and,
// when dP is given, multiplies dP by z. Keys whose positions share kpos >> 2 share one
// Philox call. p is a double, so the float64 kernels' 1/(1-p) is float64-exact.
template <typename T>
void dropout_tile(T* P, T* Pd, T* dP, int64_t ld, int64_t m, int64_t n,
                  const DropoutParams& dp, int64_t b, int64_t h, int64_t i0, int64_t j0,
                  const int64_t* qpos, const int64_t* kpos) {
  const T rescale = T(1) / (T(1) - static_cast<T>(dp.p));
  for (int64_t r = 0; r < m; ++r) {
    const int64_t q = qpos[i0 + r];
    T* prow = P + r * ld;
    T* outrow = (Pd ? Pd : P) + r * ld;
    T* drow = dP ? dP + r * ld : nullptr;
    uint64_t cached = ~uint64_t(0);
    Philox4 words{};
    for (int64_t c = 0; c < n; ++c) {
      const int64_t k = kpos[j0 + c];
      const uint64_t key = static_cast<uint64_t>(k) >> 2;
      if (key != cached) {
        words = dropout_words(dp.seed, static_cast<uint32_t>(b),
                              static_cast<uint32_t>(h + dp.head_offset), q, k);
        cached = key;
      }
      const T z = words.w[static_cast<uint64_t>(k) & 3u] >= dp.threshold ? rescale : T(0);
      outrow[c] = prow[c] * z;
      if (drow) drow[c] *= z;
    }
  }
}

// ---- vectorised row helpers ----

// max(a, b) that returns NaN when either is NaN (std::max(a, NaN) returns a), so a NaN
// score makes its row's running max NaN and the row NaN, as in math's softmax.
template <typename T>
inline T max_nan(T a, T b) {
  return (a < b || b != b) ? b : a;
}

// The row maximum, NaN if any element is NaN (at::vec::maximum propagates NaN).
template <typename T>
inline T row_max(const T* x, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) return row_max_avx512(x, n);
  }
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  T mx = -std::numeric_limits<T>::infinity();
  int64_t c = 0;
  if (n >= W) {
    Vec vm = Vec::loadu(x);
    for (c = W; c + W <= n; c += W) vm = at::vec::maximum(vm, Vec::loadu(x + c));
    mx = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  }
  for (; c < n; ++c) mx = max_nan(mx, x[c]);
  return mx;
}

// x[c] = exp((x[c] - shift) - lo); returns the row sum. lo (0 in the forward) carries the
// part of a float64 lse that float(lse) rounds away (attn_params.h): x - shift is exact
// when x is close to shift, so the backward's P keeps log(n) even where |lse| ~ 1e9..1e38.
// A NaN x[c] - shift (a NaN score, or a NaN / +inf shift) gives NaN, so the sum and the
// row become NaN.
template <typename T>
inline T exp_row_sum(T* x, int64_t n, T shift, T lo = T(0)) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) return exp_row_sum_avx512(x, n, shift, lo);
  }
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vs(shift), vlo(lo);
  Vec acc(T(0));
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    Vec e;
    if constexpr (std::is_same_v<T, float>) {
      // exp_u20 clamps its input first, which turns NaN into exp(88.7); put the NaN back.
      const Vec d = (Vec::loadu(x + c) - vs) - vlo;
      e = Vec::blendv(d.exp_u20(), d, d.isnan());
    } else {
      e = ((Vec::loadu(x + c) - vs) - vlo).exp();
    }
    e.store(x + c);
    acc = acc + e;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; c < n; ++c) {
    x[c] = std::exp((x[c] - shift) - lo);
    sum += x[c];
  }
  return sum;
}

// x[c] *= a
template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) return scale_row_avx512(x, n, a);
  }
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec va(a);
  int64_t c = 0;
  for (; c + W <= n; c += W) (Vec::loadu(x + c) * va).store(x + c);
  for (; c < n; ++c) x[c] *= a;
}

// dP[c] = P[c] * (dP[c] - delta): the softmax backward of one row.
template <typename T>
inline void ds_row(const T* P, T* dP, int64_t n, T delta) {
  if constexpr (std::is_same_v<T, float>) {
    if (use_avx512()) return ds_row_avx512(P, dP, n, delta);
  }
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const Vec vd(delta);
  int64_t c = 0;
  for (; c + W <= n; c += W) (Vec::loadu(P + c) * (Vec::loadu(dP + c) - vd)).store(dP + c);
  for (; c < n; ++c) dP[c] = P[c] * (dP[c] - delta);
}

// ---- loads / stores between the input dtype and the accumulation type ----

template <typename src_t, typename dst_t>
inline void convert_row(const src_t* src, dst_t* dst, int64_t n) {
  if constexpr (std::is_same_v<src_t, dst_t>) {
    std::copy(src, src + n, dst);
  } else if constexpr (std::is_same_v<src_t, c10::BFloat16> && std::is_same_v<dst_t, float>) {
    // bf16 -> fp32 is a 16-bit shift; the compiler vectorises this loop.
    const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(src[i]);
  }
}

// Rows r0..r0+m of a [*, cols] matrix with row stride ld (elements, may be 0) into a dense
// [m x cols] buffer.
template <typename src_t, typename dst_t>
inline void load_block(const src_t* base, int64_t ld, int64_t r0, int64_t m, int64_t cols,
                       dst_t* dst) {
  for (int64_t r = 0; r < m; ++r) convert_row(base + (r0 + r) * ld, dst + r * cols, cols);
}

// Rows r0..r0+n of a [*, cols] matrix (row stride ld) transposed into dst[cols x ldt]:
// dst[c * ldt + r] = src[r0 + r][c]. K^T and V^T blocks are the B operands of S = Q K^T
// and dP = dO V^T in gemm_bcast's layout.
template <typename src_t, typename dst_t>
inline void load_block_t(const src_t* base, int64_t ld, int64_t r0, int64_t n, int64_t cols,
                         dst_t* dst, int64_t ldt) {
  constexpr int64_t R = 16;  // rows per pass: 16 destination streams of one cache line
  for (int64_t rb = 0; rb < n; rb += R) {
    const int64_t re = std::min(n, rb + R);
    for (int64_t c = 0; c < cols; ++c) {
      dst_t* d = dst + c * ldt;
      for (int64_t r = rb; r < re; ++r) d[r] = static_cast<dst_t>(base[(r0 + r) * ld + c]);
    }
  }
}

// ---- bfloat16 pairs for the vdpbf16ps products (gemm_bf16_avx512.cpp) ----

inline uint32_t bf16_pair(const c10::BFloat16* row, int64_t c2, int64_t cols) {
  const uint32_t hi = 2 * c2 + 1 < cols ? row[2 * c2 + 1].x : 0u;
  return static_cast<uint32_t>(row[2 * c2].x) | (hi << 16);
}

// Rows r0..r0+m of a bf16 [*, cols] matrix as pairs along the row: dst[r][c2], c2 <
// ceil(cols / 2) (an odd last column is paired with 0).
inline void pack_pairs_rows(const c10::BFloat16* base, int64_t ld, int64_t r0, int64_t m,
                            int64_t cols, uint32_t* dst) {
  const int64_t cols2 = (cols + 1) / 2;
  for (int64_t r = 0; r < m; ++r) {
    const c10::BFloat16* row = base + (r0 + r) * ld;
    for (int64_t c2 = 0; c2 < cols2; ++c2) dst[r * cols2 + c2] = bf16_pair(row, c2, cols);
  }
}

// The same pairs transposed: dst[c2 * ldt + r] (the B operand of Q K^T and dO V^T).
inline void pack_pairs_t(const c10::BFloat16* base, int64_t ld, int64_t r0, int64_t n,
                         int64_t cols, uint32_t* dst, int64_t ldt) {
  const int64_t cols2 = (cols + 1) / 2;
  for (int64_t r = 0; r < n; ++r) {
    const c10::BFloat16* row = base + (r0 + r) * ld;
    for (int64_t c2 = 0; c2 < cols2; ++c2) dst[c2 * ldt + r] = bf16_pair(row, c2, cols);
  }
}

// Rows r0..r0+n in pairs of consecutive rows, interleaved: dst[(r / 2) * cols + c] holds
// rows r (low half) and r + 1 (high half) of column c; an odd last row is paired with 0.
// The B operand of a product that reduces over these rows (P V, dS K, P^T dO, dS^T Q).
inline void pack_pairs_interleaved(const c10::BFloat16* base, int64_t ld, int64_t r0, int64_t n,
                                   int64_t cols, uint32_t* dst) {
  for (int64_t r = 0; r < n; r += 2) {
    const c10::BFloat16* a = base + (r0 + r) * ld;
    const c10::BFloat16* b = r + 1 < n ? a + ld : nullptr;
    uint32_t* d = dst + (r / 2) * cols;
    for (int64_t c = 0; c < cols; ++c) d[c] = uint32_t(a[c].x) | (uint32_t(b ? b[c].x : 0) << 16);
  }
}

// Whether rows of stride ld can feed BLAS directly (same type, rows do not overlap).
template <typename src_t, typename dst_t>
inline bool direct_rows(int64_t ld, int64_t cols) {
  return std::is_same_v<src_t, dst_t> && ld >= cols && ld > 0;
}

}  // namespace ring_attn::cpu
