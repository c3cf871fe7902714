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
//    dims have stride 0): bool -> false masks the element out; float32 -> added to the
//    scaled score.
//  * A row with no surviving key gets out = 0 and lse = -inf (never NaN).
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
  MaskKind kind;        // kNone, kBool (uint8 storage) or kFloat (float32)
  const void* ptr;
  int64_t stride[4];    // b, h, i, j element strides; 0 on broadcast dims
  const int64_t* q_pos; // nullptr -> q_offset + i
  const int64_t* k_pos; // nullptr -> k_offset + j
  int64_t q_offset, k_offset;
  bool causal;
};

struct DropoutParams {
  float p;              // 0 disables dropout
  uint32_t threshold;   // dropout_threshold(p)
  uint64_t seed;
};

struct AttnFwdParams {
  AttnShape shape;
  const void* q; const void* k; const void* v;
  int64_t q_stride[4], k_stride[4], v_stride[4];  // b, h, s, d element strides (d == 1)
  void* out;                                      // [B, Hq, Sq, Dv] contiguous
  float* lse;                                     // [B, Hq, Sq] contiguous
  double scale;
  AttnMaskParams mask;
  DropoutParams dropout;
};

struct AttnBwdParams {
  AttnShape shape;
  const void* q; const void* k; const void* v; const void* dout;
  int64_t q_stride[4], k_stride[4], v_stride[4], dout_stride[4];
  const float* lse;     // [B, Hq, Sq] contiguous, the global lse
  const void* delta;    // [B, Hq, Sq] contiguous: rowsum(dout * out) - dlse, in the
                        // accumulation type (float32; float64 for float64 inputs)
  void* dq; void* dk; void* dv;                   // contiguous, shaped like q, k, v
  double scale;
  AttnMaskParams mask;
  DropoutParams dropout;
};

}  // namespace ring_attn
