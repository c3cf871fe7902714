// Plain parameter structs shared by every backend's kernels: raw pointers, element
// strides and flags, no torch types, so CUDA kernel headers never include torch.
//
// Semantics (the op contract, identical on every backend):
//  * q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv]; query head h reads KV head
//    h / (Hq / Hk) (GQA by head mapping; K/V are never repeated).
//  * Global position of local query i: q_pos ? q_pos[i] : q_offset + i (same for keys).
//    Causal keeps key j for query i iff kpos(j) <= qpos(i). Positions need not be
//    contiguous (zigzag and striped layouts pass maps).
//  * mask (optional) is read at mask + b*ms[0] + h*ms[1] + i*ms[2] + j*ms[3] (broadcast
//    dims have stride 0): bool -> false masks the element out; float (stored in the
//    accumulation type) -> added to the scaled score.
//  * The accumulation type is float for float32 / bfloat16 / float16 inputs and double
//    for float64 inputs. delta and a float mask are stored in it, so float64 inputs are
//    float64-accurate end to end.
//  * lse is float64 for every input dtype, m + log(l) formed in double. In float32 a row
//    whose scores all sit near a huge finite value (a whole row masked by finfo.min or
//    -1e9, Hugging Face padding) would round lse = m + log(n) to m, and the backward's
//    P = exp(S - lse) would be 1 instead of 1/n: gradients n times too large. The
//    backward splits lse per row into hi = float(lse), lo = float(lse - hi) and forms
//    P = exp((S - hi) - lo): S - hi is exact when S is close to hi (Sterbenz), so the
//    float32 path keeps float32 element arithmetic and still sees log(n). The ring's
//    merge of lse is float64 too.
//  * Non-finite values follow torch's math backend (sdpa_kernel([SDPBackend.MATH])):
//    masking is additive (a false / causal-excluded element adds -inf, so a NaN or +inf
//    score there stays NaN), the softmax of a row containing NaN or +inf is NaN, and
//    P V multiplies every probability, so 0 * NaN = NaN: a NaN in V[j, c] makes column c
//    NaN in every row even where key j is masked. lse is NaN where the row is NaN.
//  * A row whose every score is -inf (no surviving key, all finite) gets out = 0 and
//    lse = -inf, as math's _safe_softmax gives.
//  * Tiles may be skipped (wholly outside the band or across documents) only when the skip cannot
//    change a value: every value the tile would read finite (AttnMaskParams::nonfinite).
//  * Visibility beyond the mask (common/visibility.h, the one place it is decided): key j
//    is visible to query i iff the band keeps it, qpos(i) - window_left <= kpos(j) <=
//    qpos(i) + window_right (a bound of -1 is unbounded; causal is window_right = 0,
//    which the host sets whenever causal is, so `causal` only names the common case),
//    and, when documents are given, q_doc[i] == k_doc[j] >= 0 (doc -1: the position lies
//    in no document, e.g. ring padding; it sees nothing and is seen by nothing). An
//    invisible element adds -inf to its score, like a false bool mask element.
//  * softcap > 0 (Gemma 2): the scaled score s becomes softcap * tanh(s / softcap)
//    before the mask is added; 0 is off. The backward multiplies dS by 1 - tanh^2.
//  * Dropout keeps an element iff dropout_keep(seed, b, h, qpos, kpos, threshold) and
//    scales kept probabilities by 1/(1-p); lse is that of the un-dropped softmax.
#pragma once
#include <cstdint>

namespace ring_attn {

enum class MaskKind : int { kNone = 0, kBool = 1, kFloat = 2 };

struct AttnShape {
  int64_t B, Hq, Hk, Sq, Sk, D, Dv;
};

struct AttnMaskParams {
  MaskKind kind;        // kNone, kBool (uint8 storage) or kFloat (accumulation type)
  const void* ptr;
  int64_t stride[4];    // b, h, i, j element strides; 0 on broadcast dims
  const int64_t* q_pos; // nullptr -> q_offset + i
  const int64_t* k_pos; // nullptr -> k_offset + j
  int64_t q_offset, k_offset;
  bool causal;          // implies window_right == 0 (the host guarantees it)
  // The band on global positions, flash-attn's convention: kpos >= qpos - window_left
  // and kpos <= qpos + window_right; -1 is unbounded on that side.
  int64_t window_left, window_right;
  // Document of each local query / key (int32, the inputs' device), from cu_seqlens and
  // the positions on the host: nullptr -> one document holding every position.
  const int32_t* q_doc;
  const int32_t* k_doc;
  // The skip rule's one input besides positions: one byte, a host pointer on CPU and a
  // device pointer on CUDA (filled on the inputs' device without a host sync). Nonzero
  // when a value a skipped tile would read may be non-finite: q, k, v, a float mask
  // (NaN / +inf), and in the backward dout (through delta) and lse. Then no tile is
  // skipped, because math gives NaN there: a skipped score is NaN + -inf = NaN, and
  // 0 * NaN = NaN in P V, dO V^T and P^T dO. q counts because a query whose every key
  // is in the future still gets NaN from math when its q is NaN. nullptr: skipping is
  // exact (all finite, or not causal, so nothing is skipped). A false positive costs
  // speed only: a masked tile of finite data contributes exactly 0.
  const uint8_t* nonfinite;
};

struct DropoutParams {
  double p;             // 0 disables dropout; double so 1/(1-p) is exact for float64
  uint32_t threshold;   // dropout_threshold(p)
  uint64_t seed;
  // Global index of this call's query head 0 in the RNG key: a call over a slice of the
  // heads (Ulysses: rank u holds heads u*H/U ...) draws the single-device mask.
  int64_t head_offset;
};

struct AttnFwdParams {
  AttnShape shape;
  const void* q; const void* k; const void* v;
  int64_t q_stride[4], k_stride[4], v_stride[4];  // b, h, s, d element strides (d == 1)
  void* out;                                      // [B, Hq, Sq, Dv] contiguous
  void* lse;                                      // [B, Hq, Sq] contiguous, double
  double scale;
  double softcap;       // 0: off; else scores become softcap * tanh(score / softcap)
  AttnMaskParams mask;
  DropoutParams dropout;
};

struct AttnBwdParams {
  AttnShape shape;
  const void* q; const void* k; const void* v; const void* dout;
  int64_t q_stride[4], k_stride[4], v_stride[4], dout_stride[4];
  const void* lse;      // [B, Hq, Sq] contiguous, the global lse, double for every
                        // input dtype
  const void* delta;    // [B, Hq, Sq] contiguous: rowsum(dout * out) - dlse, in the
                        // accumulation type (float32; float64 for float64 inputs)
  void* dq; void* dk; void* dv;                   // contiguous, shaped like q, k, v
  double scale;
  double softcap;
  AttnMaskParams mask;
  DropoutParams dropout;
};

}  // namespace ring_attn
