// Which keys a query may see besides the attention mask: the band on global positions
// (causal is the band's right bound 0, a sliding window bounds it on the left) and
// document boundaries (packed variable-length sequences). Decided here once, for a single
// element and for a whole tile from the min/max of its positions and documents, and used
// by every backend's kernels; ring_attn/schedule.py applies the same rule to whole shards.
//
// A tile's status from eight numbers is exact for "skip" and "full" (they hold for every
// element of the tile) and conservative otherwise: a tile reported partial may still be
// all visible or all hidden (e.g. zigzag maps whose min/max span a gap), which costs the
// element-wise test, never a wrong value.
#pragma once
#include <cstdint>

#include "common/attn_params.h"

#if defined(__CUDACC__)
#define RING_ATTN_HD __host__ __device__ __forceinline__
#else
#define RING_ATTN_HD inline
#endif

namespace ring_attn {

enum class TileKind : int { kSkip = 0, kFull = 1, kPartial = 2 };

// Inclusive min and max over a block of positions or documents.
struct Span {
  int64_t lo, hi;
};

RING_ATTN_HD bool has_band(const AttnMaskParams& m) {
  return m.window_left >= 0 || m.window_right >= 0;
}

RING_ATTN_HD bool has_docs(const AttnMaskParams& m) { return m.q_doc != nullptr; }

// Whether anything besides the mask can hide an element (so tiles may be skipped and
// element-wise tests may be needed).
RING_ATTN_HD bool has_visibility_rule(const AttnMaskParams& m) {
  return has_band(m) || has_docs(m);
}

// Key at kpos (document kd) visible to the query at qpos (document qd)? qd/kd are read
// only when documents are given.
RING_ATTN_HD bool visible(const AttnMaskParams& m, int64_t qpos, int64_t kpos, int32_t qd,
                          int32_t kd) {
  if (m.window_right >= 0 && kpos > qpos + m.window_right) return false;
  if (m.window_left >= 0 && kpos < qpos - m.window_left) return false;
  if (m.q_doc != nullptr && (qd != kd || qd < 0)) return false;
  return true;
}

// The status of a tile of queries (positions q, documents qd) against keys (k, kd):
// kSkip when no element is visible, kFull when every element is (the band and documents
// need no element-wise test), kPartial otherwise. qd/kd are read only with documents.
RING_ATTN_HD TileKind classify_tile(const AttnMaskParams& m, Span q, Span k, Span qd, Span kd) {
  if (m.window_right >= 0 && k.lo > q.hi + m.window_right) return TileKind::kSkip;
  if (m.window_left >= 0 && k.hi < q.lo - m.window_left) return TileKind::kSkip;
  bool full = (m.window_right < 0 || k.hi <= q.lo + m.window_right) &&
              (m.window_left < 0 || k.lo >= q.hi - m.window_left);
  if (m.q_doc != nullptr) {
    if (qd.hi < 0 || kd.hi < 0 || kd.lo > qd.hi || kd.hi < qd.lo) return TileKind::kSkip;
    full = full && qd.lo == qd.hi && kd.lo == kd.hi && qd.lo == kd.lo && qd.lo >= 0;
  }
  return full ? TileKind::kFull : TileKind::kPartial;
}

// Whether a tile classified kSkip may really be skipped: only when every value it would
// read is finite (AttnMaskParams::nonfinite), since math adds -inf to a NaN score and
// gets NaN, and 0 * NaN = NaN in the products. Otherwise it is computed, masked in full.
RING_ATTN_HD bool skip_allowed(const AttnMaskParams& m) {
  return m.nonfinite == nullptr || *m.nonfinite == 0;
}

}  // namespace ring_attn
