// TORCH_LIBRARY_IMPL(ring_attn, CPU, m): the CPU implementations of attn_fwd / attn_bwd.
// Checks, mask broadcasting and allocation live in csrc/attn_host.cpp (shared with CUDA);
// this file maps the runtime dtypes to the kernel templates of csrc/cpu/attention_*.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "attn_host.h"
#include "cpu/kernels.h"

namespace ring_attn::cpu {
namespace {

using OptTensor = std::optional<at::Tensor>;

struct FwdLaunch {
  const AttnFwdParams& p;
  template <typename S, typename O>
  void operator()() const { attn_fwd_kernel<S, O>(p); }
};

struct BwdLaunch {
  const AttnBwdParams& p;
  template <typename S, typename G>
  void operator()() const { attn_bwd_kernel<S, G>(p); }
};

// Calls fn.template operator()<scalar_t, out_t>() for q's dtype and the output dtype
// (the input dtype, or float32 under out_fp32 / grad_fp32).
template <typename Fn>
void dispatch_dtypes(at::ScalarType in, at::ScalarType out, const Fn& fn) {
  const bool f32_out = out == at::kFloat;
  switch (in) {
    case at::kFloat:
      fn.template operator()<float, float>();
      break;
    case at::kDouble:
      if (f32_out) fn.template operator()<double, float>();
      else fn.template operator()<double, double>();
      break;
    case at::kBFloat16:
      if (f32_out) fn.template operator()<c10::BFloat16, float>();
      else fn.template operator()<c10::BFloat16, c10::BFloat16>();
      break;
    case at::kHalf:
      if (f32_out) fn.template operator()<c10::Half, float>();
      else fn.template operator()<c10::Half, c10::Half>();
      break;
    default:
      TORCH_CHECK(false, "ring_attn: CPU kernels support float32, float64, float16 and bfloat16, got ",
                  in);
  }
}

std::tuple<at::Tensor, at::Tensor> attn_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& attn_mask,
    const OptTensor& q_pos, const OptTensor& k_pos, int64_t q_offset, int64_t k_offset,
    bool is_causal, double scale, double dropout_p, const OptTensor& seed, bool out_fp32,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t window_left,
    int64_t window_right, double softcap,
    int64_t dropout_head_offset) {
  const FwdArgs args{q, k, v, attn_mask, q_pos, k_pos, q_offset, k_offset,
                     is_causal, scale, dropout_p, seed, cu_seqlens_q,
                     cu_seqlens_k, window_left, window_right, softcap,
                     dropout_head_offset};
  PreparedFwd prep = prepare_fwd(args, out_fp32, c10::DeviceType::CPU);
  dispatch_dtypes(prep.q.scalar_type(), prep.out.scalar_type(), FwdLaunch{prep.params});
  return {prep.out, prep.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& dlse,
    const OptTensor& attn_mask, const OptTensor& q_pos, const OptTensor& k_pos,
    int64_t q_offset, int64_t k_offset, bool is_causal, double scale, double dropout_p,
    const OptTensor& seed, bool grad_fp32, const OptTensor& cu_seqlens_q,
    const OptTensor& cu_seqlens_k, int64_t window_left, int64_t window_right, double softcap,
    int64_t dropout_head_offset) {
  const FwdArgs args{q, k, v, attn_mask, q_pos, k_pos, q_offset, k_offset,
                     is_causal, scale, dropout_p, seed, cu_seqlens_q,
                     cu_seqlens_k, window_left, window_right, softcap,
                     dropout_head_offset};
  PreparedBwd prep = prepare_bwd(dout, out, lse, dlse, args, grad_fp32, c10::DeviceType::CPU);
  dispatch_dtypes(prep.q.scalar_type(), prep.dq.scalar_type(), BwdLaunch{prep.params});
  return {prep.dq, prep.dk, prep.dv};
}

}  // namespace
}  // namespace ring_attn::cpu

TORCH_LIBRARY_IMPL(ring_attn, CPU, m) {
  m.impl("attn_fwd", &ring_attn::cpu::attn_fwd_cpu);
  m.impl("attn_bwd", &ring_attn::cpu::attn_bwd_cpu);
}
