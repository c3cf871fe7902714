// Entry points of the CPU kernels, called by csrc/cpu/launch.cpp after
// ring_attn::prepare_fwd / prepare_bwd have checked the inputs and filled the params.
#pragma once
#include "common/attn_params.h"

namespace ring_attn::cpu {

// scalar_t: the dtype of q/k/v (float, double, c10::BFloat16, c10::Half); out_t: the dtype
// of out (scalar_t, or float with out_fp32). Instantiated in attention_fwd.cpp.
template <typename scalar_t, typename out_t>
void attn_fwd_kernel(const AttnFwdParams& p);

// grad_t: the dtype of dq/dk/dv (scalar_t, or float with grad_fp32).
template <typename scalar_t, typename grad_t>
void attn_bwd_kernel(const AttnBwdParams& p);

}  // namespace ring_attn::cpu
