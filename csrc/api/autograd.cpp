// The autograd of ring_attn::attn_fwd, once, for Python and C++ callers alike: an
// Autograd-key kernel (a torch::autograd::Function) whose backward calls attn_bwd with
// the gradients of both outputs (dout, and dlse for lse) and every argument the forward
// had. Everything above the op (ring_attn::sdpa's views, the Python package, the C++
// API) differentiates through it.
//
// Refused at backward, before any kernel runs: double backward (attn_bwd has no
// derivative), a mask that requires grad, and a row saturated by a huge finite mask
// value that receives a gradient (merge.h; one host sync, skipped while a tracer runs the
// backward on stand-in tensors, which hold no values to read).
#include <ATen/ATen.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "api/refusal.h"
#include "ring_attn/merge.h"
#include "ring_attn/ops.h"

namespace ring_attn {
namespace detail {

namespace {
RefusalHandler refusal_handler = nullptr;  // set once, when the Python module loads
}  // namespace

void set_refusal_handler(RefusalHandler handler) { refusal_handler = handler; }

void refuse(const char* message) {
  if (refusal_handler != nullptr) refusal_handler(message);  // throws
  TORCH_CHECK(false, message);
}

}  // namespace detail

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// ring_attn/errors.py: DOUBLE_BACKWARD and SATURATED (tests assert them from Python).
constexpr const char* kDoubleBackward =
    "ring_attn: double backward (create_graph=True) is not supported";
constexpr const char* kMaskGrad =
    "ring_attn: gradients with respect to attn_mask are not supported";
constexpr const char* kSaturated =
    "ring_attn: a query row whose every key is masked by a huge finite additive "
    "value (|log-sum-exp| > 2^33, e.g. torch.finfo(float32).min) receives a non-zero "
    "gradient; its backward cannot be exact (log(n) is below float64's spacing "
    "there). Use a bool mask (or -inf), or give such rows a zero upstream gradient "
    "(a loss that ignores them)";

// Whether t stands in for a tensor during tracing (torch.compile, opcheck's AOT tests,
// make_fx): a fake or functional tensor (Python / Functionalize keys), a meta tensor, or
// any tensor while a dispatch mode is active. Its values cannot be read on the host.
bool tracing(const at::Tensor& t) {
  const auto keys = t.key_set();
  return keys.has(c10::DispatchKey::Python) || keys.has(c10::DispatchKey::Functionalize) ||
         t.is_meta() || c10::impl::TorchDispatchModeTLS::stack_len() > 0;
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

class AttnFwdFunction : public torch::autograd::Function<AttnFwdFunction> {
 public:
  // The mask is an input so that, when it requires grad, the outputs do and backward
  // refuses (rather than leave it silently without a gradient).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const OptTensor& attn_mask,
                               const BlockOptions& o, bool out_fp32) {
    at::AutoDispatchBelowADInplaceOrView below;  // the backend kernels, not this one again
    auto [out, lse] = attn_fwd(q, k, v, o, out_fp32);
    ctx->set_materialize_grads(false);  // an unused lse gets no zero dlse tensor
    ctx->save_for_backward({q, k, v, out, lse, o.attn_mask().value_or(at::Tensor()),
                            o.q_pos().value_or(at::Tensor()), o.k_pos().value_or(at::Tensor()),
                            o.seed().value_or(at::Tensor()),
                            o.cu_seqlens_q().value_or(at::Tensor()),
                            o.cu_seqlens_k().value_or(at::Tensor())});
    auto& d = ctx->saved_data;
    d["q_offset"] = o.q_offset();
    d["k_offset"] = o.k_offset();
    d["is_causal"] = o.is_causal();
    d["scale"] = o.scale();
    d["dropout_p"] = o.dropout_p();
    d["window_left"] = o.window_left();
    d["window_right"] = o.window_right();
    d["softcap"] = o.softcap();
    d["dropout_head_offset"] = o.dropout_head_offset();
    d["mask_needs_grad"] = attn_mask.has_value() && attn_mask->requires_grad();
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The engine runs a backward with grad mode on exactly under create_graph=True; the
    // backward op has no derivative, so going on would return graph-less gradients.
    if (at::GradMode::is_enabled()) detail::refuse(kDoubleBackward);
    auto& d = ctx->saved_data;
    if (d["mask_needs_grad"].toBool()) detail::refuse(kMaskGrad);
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4];
    at::Tensor dout = grads[0];
    if (!dout.defined()) {
      dout = at::zeros_like(out);
    } else if (!tracing(lse)) {
      if (saturated_rows(lse, dout).item<bool>()) detail::refuse(kSaturated);  // one host sync
    }
    BlockOptions o;
    o.attn_mask(opt(s[5]))
        .q_pos(opt(s[6]))
        .k_pos(opt(s[7]))
        .seed(opt(s[8]))
        .cu_seqlens_q(opt(s[9]))
        .cu_seqlens_k(opt(s[10]))
        .q_offset(d["q_offset"].toInt())
        .k_offset(d["k_offset"].toInt())
        .is_causal(d["is_causal"].toBool())
        .scale(d["scale"].toDouble())
        .dropout_p(d["dropout_p"].toDouble())
        .window_left(d["window_left"].toInt())
        .window_right(d["window_right"].toInt())
        .softcap(d["softcap"].toDouble())
        .dropout_head_offset(d["dropout_head_offset"].toInt());
    auto [dq, dk, dv] = attn_bwd(dout, q, k, v, out, lse, opt(grads[1]), o);
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The Autograd kernel of ring_attn::attn_fwd: the schema's arguments, in order.
std::tuple<at::Tensor, at::Tensor> attn_fwd_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& attn_mask,
    const OptTensor& q_pos, const OptTensor& k_pos, int64_t q_offset, int64_t k_offset,
    bool is_causal, double scale, double dropout_p, const OptTensor& seed, bool out_fp32,
    const OptTensor& cu_seqlens_q, const OptTensor& cu_seqlens_k, int64_t window_left,
    int64_t window_right, double softcap, int64_t dropout_head_offset) {
  BlockOptions o;
  o.attn_mask(attn_mask)
      .q_pos(q_pos)
      .k_pos(k_pos)
      .q_offset(q_offset)
      .k_offset(k_offset)
      .is_causal(is_causal)
      .scale(scale)
      .dropout_p(dropout_p)
      .seed(seed)
      .cu_seqlens_q(cu_seqlens_q)
      .cu_seqlens_k(cu_seqlens_k)
      .window_left(window_left)
      .window_right(window_right)
      .softcap(softcap)
      .dropout_head_offset(dropout_head_offset);
  const variable_list outs = AttnFwdFunction::apply(q, k, v, attn_mask, o, out_fp32);
  return {outs[0], outs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(ring_attn, Autograd, m) {
  m.impl("attn_fwd", &attn_fwd_autograd);
}

}  // namespace ring_attn
