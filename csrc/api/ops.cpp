// The one place C++ calls the registered ops: typed dispatcher handles of
// ring_attn::attn_fwd / attn_bwd / sdpa (schemas in csrc/ring_attn.cpp). A schema change
// (a new trailing argument) is adapted here and in BlockOptions / AttentionOptions,
// nowhere else.
#include "ring_attn/ops.h"

#include "ring_attn/attention.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace ring_attn {
namespace {

using OptTensor = std::optional<at::Tensor>;

using FwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, int64_t, int64_t, bool, double, double,
    const OptTensor&, bool, const OptTensor&, const OptTensor&, int64_t, int64_t, double,
    int64_t);

using BwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, int64_t, int64_t, bool, double, double,
    const OptTensor&, bool, const OptTensor&, const OptTensor&, int64_t, int64_t, double,
    int64_t);

using SdpaSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const OptTensor&, double, bool, std::optional<double>, bool,
                           int64_t, int64_t, double, const OptTensor&);

// Looked up once, on first use (the registering static initialisers have run by then).
const c10::TypedOperatorHandle<FwdSig>& fwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ring_attn::attn_fwd", "")
                             .typed<FwdSig>();
  return op;
}

const c10::TypedOperatorHandle<BwdSig>& bwd_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("ring_attn::attn_bwd", "")
                             .typed<BwdSig>();
  return op;
}

const c10::TypedOperatorHandle<SdpaSig>& sdpa_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("ring_attn::sdpa", "").typed<SdpaSig>();
  return op;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attn_fwd(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const BlockOptions& o,
                                            bool out_fp32) {
  return fwd_op().call(q, k, v, o.attn_mask(), o.q_pos(), o.k_pos(), o.q_offset(),
                       o.k_offset(), o.is_causal(), o.scale(), o.dropout_p(), o.seed(),
                       out_fp32, o.cu_seqlens_q(), o.cu_seqlens_k(), o.window_left(),
                       o.window_right(), o.softcap(), o.dropout_head_offset());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attn_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const OptTensor& dlse,
    const BlockOptions& o, bool grad_fp32) {
  return bwd_op().call(dout, q, k, v, out, lse, dlse, o.attn_mask(), o.q_pos(), o.k_pos(),
                       o.q_offset(), o.k_offset(), o.is_causal(), o.scale(), o.dropout_p(),
                       o.seed(), grad_fp32, o.cu_seqlens_q(), o.cu_seqlens_k(),
                       o.window_left(), o.window_right(), o.softcap(),
                       o.dropout_head_offset());
}

at::Tensor scaled_dot_product_attention(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value, const AttentionOptions& o) {
  // The seed (dropout_p > 0) is drawn inside the op, after its checks.
  return sdpa_op().call(query, key, value, o.attn_mask(), o.dropout_p(), o.is_causal(),
                        o.scale(), o.enable_gqa(), o.window_left(), o.window_right(),
                        o.softcap(), std::nullopt);
}

at::Tensor draw_dropout_seed() {
  // torch.randint(0, 2**62, (), dtype=torch.int64): the same call on the same default
  // CPU generator (whatever the inputs' device), hence the same value for the same seed.
  return at::randint(0, int64_t{1} << 62, {}, at::TensorOptions().dtype(at::kLong));
}

bool has_kernel(c10::DeviceType device) {
  const auto key = c10::computeDispatchKey(std::nullopt, std::nullopt, device);
  return fwd_op().hasKernelForDispatchKey(key);
}

}  // namespace ring_attn
