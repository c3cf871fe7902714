// Host-side preparation shared by every backend: ATen checks that name the argument, the
// expected and the actual value; mask broadcasting (stride 0, never materialised);
// position maps; output allocation; and the parameter structs the kernels take.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <vector>

#include "common/attn_params.h"

namespace ring_attn {

struct FwdArgs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const std::optional<at::Tensor>& attn_mask;
  const std::optional<at::Tensor>& q_pos;
  const std::optional<at::Tensor>& k_pos;
  int64_t q_offset, k_offset;
  bool is_causal;
  double scale, dropout_p;
  const std::optional<at::Tensor>& seed;
  const std::optional<at::Tensor>& cu_seqlens_q;
  const std::optional<at::Tensor>& cu_seqlens_k;
  int64_t window_left, window_right;
  double softcap;
  int64_t dropout_head_offset;
};

// The inputs both directions launch on, prepared once (last dim unit-stride, mask as a
// broadcast view, positions as int64 on the device); the params point into them.
struct PreparedInputs {
  at::Tensor q, k, v, mask, q_pos, k_pos;
  at::Tensor q_doc, k_doc;  // int32 document per position (AttnMaskParams::q_doc / k_doc)
  at::Tensor nonfinite;  // the one byte AttnMaskParams::nonfinite points to (causal only)
};

// Everything a backend needs to launch: the params plus the tensors their pointers point
// into (kept alive here).
struct PreparedFwd : PreparedInputs {
  AttnFwdParams params;
  at::Tensor out, lse;
};

struct PreparedBwd : PreparedInputs {
  AttnBwdParams params;
  at::Tensor dout, lse, delta, dq, dk, dv;
};

PreparedFwd prepare_fwd(const FwdArgs& a, bool out_fp32, c10::DeviceType device);

PreparedBwd prepare_bwd(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                        const std::optional<at::Tensor>& dlse, const FwdArgs& a,
                        bool grad_fp32, c10::DeviceType device);

// Reduce float32 per-query-head dK/dV [B, Hq, Sk, *] to [B, Hk, Sk, *] for backends whose
// kernels write one slice per query head.
at::Tensor sum_kv_groups(const at::Tensor& per_q_head, int64_t hk);

}  // namespace ring_attn
