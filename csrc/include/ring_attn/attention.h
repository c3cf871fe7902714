// ring_attn C++ API: exact attention on one device, a drop-in for
// at::scaled_dot_product_attention with autograd, plus sliding windows and soft-capping.
//
//   #include <ring_attn/attention.h>
//   auto out = ring_attn::scaled_dot_product_attention(
//       q, k, v, ring_attn::AttentionOptions().is_causal(true));
//   out.sum().backward();   // gradients through ring_attn::attn_bwd
//
// Semantics are those of the Python ring_attn.scaled_dot_product_attention (and torch's
// SDPA): inputs [..., L, E] / [..., S, E] / [..., S, Ev] with batch dims broadcast; heads
// (dim -3) broadcast from one head, or grouped (GQA) with enable_gqa; top-left causal
// alignment when L != S; bool or additive masks (bool, float32 or the query's dtype)
// broadcastable to [..., L, S]; scale unset -> 1/sqrt(E); dropout whenever dropout_p > 0
// with a seed from torch's default generator (the Python package's seed, draw_dropout_seed
// in ops.h). Rows whose keys are all masked give 0. fp32 / fp64 / fp16 / bf16 on CPU, and
// CUDA when the library was built with it.
//
// One implementation with the Python package: this function calls the registered op
// ring_attn::sdpa (csrc/api/attention.cpp: the argument rules, the broadcasting to the
// kernel's 4-D views, the seed), which ring_attn.scaled_dot_product_attention calls too;
// the gradient comes from attn_fwd's autograd kernel (csrc/api/autograd.cpp), whose
// backward calls ring_attn::attn_bwd.
//
// Bad input raises the exception type torch's SDPA raises, naming the argument, the
// expected and the actual value (dtypes and shapes printed as Python prints them,
// torch.float32 and (2, 4, 8, 16), the same message as from Python): c10::Error
// (RuntimeError) for bad values, c10::IndexError for a 0-D or 1-D mask,
// c10::NotImplementedError for a dtype or device without a kernel. Double backward,
// gradients with respect to attn_mask, and a gradient reaching a row every key of which
// is masked by a huge finite value (|lse| > 2^33, merge.h) raise at backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/arg.h>

#include <cstdint>
#include <optional>

#include "ring_attn/merge.h"
#include "ring_attn/ops.h"

namespace ring_attn {

struct AttentionOptions {
  TORCH_ARG(std::optional<at::Tensor>, attn_mask) = std::nullopt;
  TORCH_ARG(double, dropout_p) = 0.0;
  TORCH_ARG(bool, is_causal) = false;
  TORCH_ARG(std::optional<double>, scale) = std::nullopt;
  TORCH_ARG(bool, enable_gqa) = false;
  // Beyond torch's SDPA (ring_attn.attention): query i sees keys i - left ... i + right
  // (-1 unbounded; is_causal is right = 0, so window (left, 0) is a causal window, and
  // unlike is_causal it combines with attn_mask); softcap > 0 makes each score
  // softcap * tanh(s / softcap) before the mask (Gemma 2); 0 is off.
  TORCH_ARG(int64_t, window_left) = -1;
  TORCH_ARG(int64_t, window_right) = -1;
  TORCH_ARG(double, softcap) = 0.0;
};

at::Tensor scaled_dot_product_attention(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value,
                                        const AttentionOptions& options = {});

}  // namespace ring_attn
