// ring_attn C++ API: the block-level ops, for C++ code that drives its own loop (a ring
// over c10d, a KV cache). These call the registered ops ring_attn::attn_fwd / attn_bwd
// through the dispatcher, exactly as Python's torch.ops.ring_attn.* does, so CPU and CUDA
// tensors reach the same kernels. The schemas and every argument's meaning are documented
// once, in csrc/ring_attn.cpp; BlockOptions carries their optional arguments with the same
// names and defaults.
//
// attn_fwd is differentiable: the op's autograd kernel (csrc/api/autograd.cpp, the one
// Python uses too) calls attn_bwd with the gradients of out and lse. attn_bwd has no
// derivative (double backward raises).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace ring_attn {

struct BlockOptions {
  // Bool or additive mask broadcastable to [B, Hq, Sq, Sk] (4-D).
  TORCH_ARG(std::optional<at::Tensor>, attn_mask) = std::nullopt;
  // Global positions of the queries [Sq] / keys [Sk] (int64), else offset + index.
  TORCH_ARG(std::optional<at::Tensor>, q_pos) = std::nullopt;
  TORCH_ARG(std::optional<at::Tensor>, k_pos) = std::nullopt;
  TORCH_ARG(int64_t, q_offset) = 0;
  TORCH_ARG(int64_t, k_offset) = 0;
  // Key j is kept for query i iff kpos(j) <= qpos(i).
  TORCH_ARG(bool, is_causal) = false;
  // The softmax scale itself (no default of 1/sqrt(D) at this level).
  TORCH_ARG(double, scale) = 1.0;
  TORCH_ARG(double, dropout_p) = 0.0;
  // One-element int64 tensor, required when dropout_p > 0 (draw_dropout_seed()).
  TORCH_ARG(std::optional<at::Tensor>, seed) = std::nullopt;
  // Documents: cumulative lengths (int32/int64, both or neither) in position coordinates.
  TORCH_ARG(std::optional<at::Tensor>, cu_seqlens_q) = std::nullopt;
  TORCH_ARG(std::optional<at::Tensor>, cu_seqlens_k) = std::nullopt;
  // Band qpos - left <= kpos <= qpos + right on global positions, -1 unbounded.
  TORCH_ARG(int64_t, window_left) = -1;
  TORCH_ARG(int64_t, window_right) = -1;
  // > 0: scores become softcap * tanh(score / softcap) before the mask.
  TORCH_ARG(double, softcap) = 0.0;
  // Global index of q's head 0 in the dropout RNG key (a rank holding a slice of heads).
  TORCH_ARG(int64_t, dropout_head_offset) = 0;
};

// Attention of one (query block, key block) pair: out [B, Hq, Sq, Dv] in q's dtype (float32
// with out_fp32, for accumulating a ring) and lse [B, Hq, Sq] in float64. Rows with no
// visible key give out = 0, lse = -inf. Bad input raises c10::Error naming the argument.
std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v,
                                            const BlockOptions& options = {},
                                            bool out_fp32 = false);

// Gradients (dq, dk, dv) of attn_fwd for the out and lse to use (a ring passes its merged,
// global ones); dlse is the gradient flowing into lse, if any. Same options as the
// forward. Gradients in the inputs' dtype, or float32 with grad_fp32.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& dlse,
    const BlockOptions& options = {}, bool grad_fp32 = false);

// A dropout seed drawn from torch's default CPU generator, exactly as the Python package
// draws it (ring_attn.functional.draw_seed: randint(0, 2^62) as a 0-D int64 tensor), so
// the same torch::manual_seed gives the same dropout mask from C++ and from Python.
at::Tensor draw_dropout_seed();

// Whether this build registered a kernel of the ops for the device type (CPU, CUDA).
bool has_kernel(c10::DeviceType device);

}  // namespace ring_attn
