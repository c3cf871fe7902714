// ring_attn::scaled_dot_product_attention: torch's SDPA argument rules (batch and head
// broadcasting, GQA, mask shapes and dtypes, default scale) in front of the attn_fwd op,
// and a torch::autograd::Function whose backward calls the attn_bwd op. The same rules,
// with the same messages, are applied in Python by ring_attn/functional.py (which needs
// them as Python code so torch.compile can trace them); the op's own host checks
// (csrc/attn_host.cpp) are shared by both and are not repeated here.
#include "ring_attn/attention.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace ring_attn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ring_attn/errors.py: DOUBLE_BACKWARD and SATURATED.
constexpr const char* kDoubleBackward =
    "ring_attn: double backward (create_graph=True) is not supported";
constexpr const char* kSaturated =
    "ring_attn: a query row whose every key is masked by a huge finite additive "
    "value (|log-sum-exp| > 2^33, e.g. torch.finfo(float32).min) receives a non-zero "
    "gradient; its backward cannot be exact (log(n) is below float64's spacing "
    "there). Use a bool mask (or -inf), or give such rows a zero upstream gradient "
    "(a loss that ignores them)";

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

int64_t heads_of(const at::Tensor& t) { return t.dim() >= 3 ? t.size(-3) : 1; }

std::vector<int64_t> lead_dims(const at::Tensor& t) {
  return t.dim() >= 3 ? t.sizes().slice(0, t.dim() - 3).vec() : std::vector<int64_t>{};
}

// Inputs torch's SDPA rejects, in the order functional.validate_inputs checks them.
void validate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const AttentionOptions& o) {
  const auto& mask = o.attn_mask();
  TORCH_CHECK_INDEX(!mask.has_value() || mask->dim() >= 2,
                    "ring_attn: attn_mask must be at least 2-D [..., L, S], got ",
                    mask->dim(), "-D of shape ", mask->sizes());
  TORCH_CHECK(o.dropout_p() >= 0.0 && o.dropout_p() < 1.0,
              "ring_attn: dropout_p must be in [0, 1), got ", o.dropout_p());
  TORCH_CHECK(!o.scale().has_value() || std::isfinite(*o.scale()),
              "ring_attn: scale must be finite or None, got ", *o.scale());
  TORCH_CHECK(o.window_left() >= -1 && o.window_right() >= -1,
              "ring_attn: window bounds must be >= 0, or -1 for unbounded, got (",
              o.window_left(), ", ", o.window_right(), ")");
  TORCH_CHECK(std::isfinite(o.softcap()) && o.softcap() >= 0.0,
              "ring_attn: softcap must be finite and > 0 (or 0 for off), got ", o.softcap());
  const at::Tensor* ts[3] = {&q, &k, &v};
  const char* names[3] = {"query", "key", "value"};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(ts[i]->dim() >= 2, "ring_attn: ", names[i],
                " must be at least 2-D [..., L, E], got ", ts[i]->dim(), "-D of shape ",
                ts[i]->sizes());
  }
  TORCH_CHECK(q.device().type() == k.device().type() && q.device().type() == v.device().type(),
              "ring_attn: query, key and value must be on the same device, got query ",
              q.device(), ", key ", k.device(), ", value ", v.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "ring_attn: query, key and value must have the same dtype, got query ",
              q.scalar_type(), ", key ", k.scalar_type(), ", value ", v.scalar_type());
  if (!is_kernel_dtype(q.scalar_type())) {
    // torch: NotImplementedError for complex and float8 (no kernel for the dtype),
    // RuntimeError for integer and bool ("expected scalar type Float").
    const bool exotic = at::isComplexType(q.scalar_type()) ||
                        at::isFloatingType(q.scalar_type());
    const std::string msg = "ring_attn: query dtype must be one of float32, float64, "
                            "float16, bfloat16, got " +
                            std::string(c10::toString(q.scalar_type()));
    TORCH_CHECK_NOT_IMPLEMENTED(!exotic, msg);
    TORCH_CHECK(false, msg);
  }
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "ring_attn: query, key and value must be on the same device, got query ",
              q.device(), ", key ", k.device(), ", value ", v.device());
  TORCH_CHECK_NOT_IMPLEMENTED(has_kernel(q.device().type()), "ring_attn: no kernel for device ",
                              q.device(), " (this build has: ",
                              has_kernel(c10::DeviceType::CUDA) ? "cpu, cuda" : "cpu",
                              "); move the inputs or rebuild with CUDA");
  TORCH_CHECK(k.size(-1) == q.size(-1), "ring_attn: key head dim must equal query's ",
              q.size(-1), ", got ", k.size(-1));
  TORCH_CHECK(v.size(-2) == k.size(-2), "ring_attn: value length must equal key's ",
              k.size(-2), ", got ", v.size(-2));
  if (mask.has_value()) {
    TORCH_CHECK(!o.is_causal(), "ring_attn: attn_mask must be None when is_causal=True "
                "(torch's rule: an explicit mask and is_causal are exclusive)");
    const auto mt = mask->scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kFloat || mt == q.scalar_type(),
                "ring_attn: attn_mask dtype must be bool, float32 or match query's ",
                q.scalar_type(), ", got ", mt);
    TORCH_CHECK(mask->device() == q.device(), "ring_attn: attn_mask must be on query's device ",
                q.device(), ", got ", mask->device());
  }
}

// (query heads, key/value heads) the kernel sees (functional._head_counts): heads
// broadcast like batch dims (one head serves any number), else Hq == Hkv, or a multiple
// of it with enable_gqa.
std::pair<int64_t, int64_t> head_counts(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, bool enable_gqa) {
  const int64_t hq = heads_of(q), hk = heads_of(k), hv = heads_of(v);
  TORCH_CHECK(hk == hv || hk == 1 || hv == 1, "ring_attn: key and value head counts differ: key ",
              hk, ", value ", hv);
  const int64_t hkv = hk != hv ? std::max(hk, hv) : hk;
  if (hq == hkv) return {hq, hkv};
  if (enable_gqa) {
    TORCH_CHECK(hkv != 0 && hq % hkv == 0, "ring_attn: query heads (", hq,
                ") must be a multiple of key/value heads (", hkv, ") with enable_gqa=True");
    return {hq, hkv};
  }
  if (hq == 1) return {hkv, hkv};
  if (hkv == 1) return {hq, 1};  // the kernel's GQA mapping with one group: no K/V copy
  TORCH_CHECK(false, "ring_attn: query has ", hq, " heads but key/value have ", hkv,
              "; pass enable_gqa=True for grouped-query attention");
}

// Broadcast batch dims (everything before the head dim -3).
std::vector<int64_t> batch_shape(const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v) {
  const std::vector<int64_t> lead[3] = {lead_dims(q), lead_dims(k), lead_dims(v)};
  size_t n = 0;
  for (const auto& l : lead) n = std::max(n, l.size());
  std::vector<int64_t> out(n, 1);
  for (const auto& l : lead) {
    for (size_t i = 0; i < l.size(); ++i) {
      int64_t& o = out[n - l.size() + i];
      TORCH_CHECK(l[i] == o || l[i] == 1 || o == 1, "ring_attn: batch dims of query ",
                  at::IntArrayRef(lead[0]), ", key ", at::IntArrayRef(lead[1]), " and value ",
                  at::IntArrayRef(lead[2]), " do not broadcast");
      if (o == 1) o = l[i];
    }
  }
  return out;
}

int64_t product(const std::vector<int64_t>& s) {
  int64_t p = 1;
  for (int64_t x : s) p *= x;
  return p;
}

// [..., H, S, E] -> [B, heads, S, E]: batch dims and a single head broadcast with stride
// 0 (no copy unless several broadcast batch dims must merge).
at::Tensor to_4d(const at::Tensor& t, const std::vector<int64_t>& batch, int64_t heads) {
  std::vector<int64_t> shape = batch;
  shape.insert(shape.end(), {heads, t.size(-2), t.size(-1)});
  at::Tensor e = (t.dim() == 2 ? t.unsqueeze(0) : t).expand(shape);
  return batch.size() == 1 ? e : e.reshape({product(batch), heads, t.size(-2), t.size(-1)});
}

at::Tensor mask_to_4d(const at::Tensor& mask, const std::vector<int64_t>& batch, int64_t hq,
                      int64_t lq, int64_t lk) {
  std::vector<int64_t> full = batch;
  full.insert(full.end(), {hq, lq, lk});
  bool ok = mask.dim() <= static_cast<int64_t>(full.size());
  for (int64_t i = 1; ok && i <= mask.dim(); ++i) {
    const int64_t m = mask.size(-i), f = full[full.size() - i];
    ok = m == f || m == 1;
  }
  TORCH_CHECK(ok, "ring_attn: attn_mask shape ", mask.sizes(),
              " does not broadcast to [..., L, S] = ", at::IntArrayRef(full));
  const at::Tensor e = mask.expand(full);
  return batch.size() == 1 ? e : e.reshape({product(batch), hq, lq, lk});
}

// Autograd over the attn_fwd op: inputs are the kernel's 4-D views; the mask is an input
// only so that a mask requiring grad is refused at backward, as in Python (ops.py).
class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const std::optional<at::Tensor>& mask,
                            const BlockOptions& opts) {
    auto [out, lse] = attn_fwd(q, k, v, opts);
    ctx->save_for_backward({q, k, v, out, lse, mask.value_or(at::Tensor()),
                            opts.seed().value_or(at::Tensor())});
    ctx->saved_data["is_causal"] = opts.is_causal();
    ctx->saved_data["scale"] = opts.scale();
    ctx->saved_data["dropout_p"] = opts.dropout_p();
    ctx->saved_data["window_left"] = opts.window_left();
    ctx->saved_data["window_right"] = opts.window_right();
    ctx->saved_data["softcap"] = opts.softcap();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The engine runs a backward with grad mode on exactly under create_graph=True; the
    // backward op has no derivative, so going on would return graph-less gradients.
    TORCH_CHECK(!at::GradMode::is_enabled(), kDoubleBackward);
    const variable_list s = ctx->get_saved_variables();
    // The mask is the 4th differentiable input only when given (an empty optional is no
    // input of the node).
    TORCH_CHECK(!s[5].defined() || !ctx->needs_input_grad(3),
                "ring_attn: gradients with respect to attn_mask are not supported");
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4];
    at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(out);
    TORCH_CHECK(!saturated_rows(lse, dout).item<bool>(), kSaturated);  // one host sync
    BlockOptions opts;
    opts.is_causal(ctx->saved_data["is_causal"].toBool())
        .scale(ctx->saved_data["scale"].toDouble())
        .dropout_p(ctx->saved_data["dropout_p"].toDouble())
        .window_left(ctx->saved_data["window_left"].toInt())
        .window_right(ctx->saved_data["window_right"].toInt())
        .softcap(ctx->saved_data["softcap"].toDouble());
    if (s[5].defined()) opts.attn_mask(s[5]);
    if (s[6].defined()) opts.seed(s[6]);
    auto [dq, dk, dv] = attn_bwd(dout, q, k, v, out, lse, std::nullopt, opts);
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor scaled_dot_product_attention(const at::Tensor& query, const at::Tensor& key,
                                        const at::Tensor& value,
                                        const AttentionOptions& options) {
  validate(query, key, value, options);
  const std::vector<int64_t> batch = batch_shape(query, key, value);
  const int64_t e = query.size(-1);
  const double scale = options.scale().value_or(e > 0 ? 1.0 / std::sqrt(double(e)) : 1.0);
  const auto [hq, hkv] = head_counts(query, key, value, options.enable_gqa());
  const at::Tensor q4 = to_4d(query, batch, hq);
  const at::Tensor k4 = to_4d(key, batch, hkv);
  const at::Tensor v4 = to_4d(value, batch, hkv);
  const int64_t lq = q4.size(2), lk = k4.size(2);
  std::optional<at::Tensor> mask4;
  if (options.attn_mask().has_value()) {
    mask4 = mask_to_4d(*options.attn_mask(), batch, hq, lq, lk);
  }
  BlockOptions opts;
  opts.attn_mask(mask4)
      .is_causal(options.is_causal())
      .scale(scale)
      .dropout_p(options.dropout_p())
      .window_left(options.window_left())
      .window_right(options.window_right())
      .softcap(options.softcap());
  if (options.dropout_p() > 0.0) opts.seed(draw_dropout_seed());
  const at::Tensor out = AttentionFunction::apply(q4, k4, v4, mask4, opts);
  // Output rank is the largest input rank, as with torch's broadcasting matmuls.
  std::vector<int64_t> full = batch;
  full.insert(full.end(), {hq, lq, value.size(-1)});
  const int64_t rank = std::max({query.dim(), key.dim(), value.dim()});
  const size_t drop = full.size() > size_t(rank) ? full.size() - size_t(rank) : 0;
  return out.reshape(at::IntArrayRef(full).slice(drop));
}

}  // namespace ring_attn
