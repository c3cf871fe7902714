// The op ring_attn::sdpa: torch's SDPA argument rules (batch and head broadcasting, GQA,
// mask shapes and dtypes, default scale) in front of the attn_fwd op, written once and
// registered CompositeImplicitAutograd, so that the Python entry
// (ring_attn/functional.py) and the C++ API (ring_attn::scaled_dot_product_attention)
// run this same code. Its gradient is that of the view ops here and of attn_fwd, whose
// autograd kernel (csrc/api/autograd.cpp) calls attn_bwd. ring_attn::_sdpa_check runs the
// argument rules alone (the simulated ring's inputs).
//
// Sizes are read as SymInts and compared with SymInt operators: torch.compile(dynamic=
// True) runs this C++ on fake tensors whose sizes are symbols, and a comparison there
// becomes a guard of the compiled graph, as the same comparison in Python would. Messages
// print dtypes and shapes as Python does (torch.float32, (2, 4, 5, 8)): the Python package
// is where most callers see them, and tests/test_errors.py asserts them.
#include "ring_attn/attention.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

namespace ring_attn {
namespace {

using c10::SymInt;
using SymVec = std::vector<SymInt>;

bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// torch.float32, as Python prints a dtype.
std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

// (2, 4), (6,) or (), as Python prints a tuple of sizes.
std::string tuple_str(c10::SymIntArrayRef s) {
  std::ostringstream o;
  o << '(';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

SymInt heads_of(const at::Tensor& t) { return t.dim() >= 3 ? t.sym_size(-3) : SymInt(1); }

SymVec lead_dims(const at::Tensor& t) {
  return t.dim() >= 3 ? t.sym_sizes().slice(0, t.dim() - 3).vec() : SymVec{};
}

// Inputs torch's SDPA rejects, and those it lets through that the kernels cannot make
// exact (dropout_p = 1, a non-finite scale). Python checks the arguments' Python types
// first (functional.py); everything about values is here.
void validate(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const AttentionOptions& o) {
  const auto& mask = o.attn_mask();
  TORCH_CHECK_INDEX(!mask.has_value() || mask->dim() >= 2,
                    "ring_attn: attn_mask must be at least 2-D [..., L, S], got ",
                    mask->dim(), "-D of shape ", tuple_str(mask->sym_sizes()));
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
                tuple_str(ts[i]->sym_sizes()));
  }
  TORCH_CHECK(q.device().type() == k.device().type() && q.device().type() == v.device().type(),
              "ring_attn: query, key and value must be on the same device, got query ",
              q.device(), ", key ", k.device(), ", value ", v.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "ring_attn: query, key and value must have the same dtype, got query ",
              dtype_name(q.scalar_type()), ", key ", dtype_name(k.scalar_type()), ", value ",
              dtype_name(v.scalar_type()));
  if (!is_kernel_dtype(q.scalar_type())) {
    // torch: NotImplementedError for complex and float8 (no kernel for the dtype),
    // RuntimeError for integer and bool ("expected scalar type Float").
    const bool exotic = at::isComplexType(q.scalar_type()) ||
                        at::isFloatingType(q.scalar_type());
    const std::string msg = "ring_attn: query dtype must be one of float32, float64, "
                            "float16, bfloat16, got " + dtype_name(q.scalar_type());
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
  TORCH_CHECK(k.sym_size(-1) == q.sym_size(-1), "ring_attn: key head dim must equal query's ",
              q.sym_size(-1), ", got ", k.sym_size(-1));
  TORCH_CHECK(v.sym_size(-2) == k.sym_size(-2), "ring_attn: value length must equal key's ",
              k.sym_size(-2), ", got ", v.sym_size(-2));
  if (mask.has_value()) {
    TORCH_CHECK(!o.is_causal(), "ring_attn: attn_mask must be None when is_causal=True "
                "(torch's rule: an explicit mask and is_causal are exclusive)");
    const auto mt = mask->scalar_type();
    TORCH_CHECK(mt == at::kBool || mt == at::kFloat || mt == q.scalar_type(),
                "ring_attn: attn_mask dtype must be bool, float32 or match query's ",
                dtype_name(q.scalar_type()), ", got ", dtype_name(mt));
    TORCH_CHECK(mask->device() == q.device(), "ring_attn: attn_mask must be on query's device ",
                q.device(), ", got ", mask->device());
  }
}

// (query heads, key/value heads) the kernel sees: heads broadcast like batch dims (one
// head serves any number), as in torch's math backend; else Hq == Hkv, or a multiple of
// it with enable_gqa.
std::pair<SymInt, SymInt> head_counts(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, bool enable_gqa) {
  const SymInt hq = heads_of(q), hk = heads_of(k), hv = heads_of(v);
  TORCH_CHECK(hk == hv || hk == 1 || hv == 1, "ring_attn: key and value head counts differ: key ",
              hk, ", value ", hv);
  const SymInt hkv = hk == hv ? hk : (hk > hv ? hk : hv);
  if (hq == hkv) return {hq, hkv};
  if (enable_gqa) {
    TORCH_CHECK(hkv != 0 && hq % hkv == 0, "ring_attn: query heads (", hq,
                ") must be a multiple of key/value heads (", hkv, ") with enable_gqa=True");
    return {hq, hkv};
  }
  if (hq == 1) return {hkv, hkv};
  if (hkv == 1) return {hq, SymInt(1)};  // the kernel's GQA mapping with one group: no copy
  TORCH_CHECK(false, "ring_attn: query has ", hq, " heads but key/value have ", hkv,
              "; pass enable_gqa=True for grouped-query attention");
}

// Broadcast batch dims (everything before the head dim -3).
SymVec batch_shape(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const SymVec lead[3] = {lead_dims(q), lead_dims(k), lead_dims(v)};
  size_t n = 0;
  for (const auto& l : lead) n = std::max(n, l.size());
  SymVec out(n, SymInt(1));
  for (const auto& l : lead) {
    for (size_t i = 0; i < l.size(); ++i) {
      SymInt& o = out[n - l.size() + i];
      TORCH_CHECK(l[i] == o || l[i] == 1 || o == 1, "ring_attn: batch dims of query ",
                  tuple_str(lead[0]), ", key ", tuple_str(lead[1]), " and value ",
                  tuple_str(lead[2]), " do not broadcast");
      if (o == 1) o = l[i];
    }
  }
  return out;
}

SymInt product(const SymVec& s) {
  SymInt p = 1;
  for (const auto& x : s) p = p * x;
  return p;
}

// [..., H, S, E] -> [B, heads, S, E]: batch dims and a single head broadcast with stride
// 0 (no copy unless several broadcast batch dims must merge).
at::Tensor to_4d(const at::Tensor& t, const SymVec& batch, const SymInt& heads) {
  SymVec shape = batch;
  shape.insert(shape.end(), {heads, t.sym_size(-2), t.sym_size(-1)});
  at::Tensor e = (t.dim() == 2 ? t.unsqueeze(0) : t).expand_symint(shape);
  return batch.size() == 1
             ? e
             : e.reshape_symint({product(batch), heads, t.sym_size(-2), t.sym_size(-1)});
}

at::Tensor mask_to_4d(const at::Tensor& mask, const SymVec& batch, const SymInt& hq,
                      const SymInt& lq, const SymInt& lk) {
  SymVec full = batch;
  full.insert(full.end(), {hq, lq, lk});
  bool ok = mask.dim() <= static_cast<int64_t>(full.size());
  for (int64_t i = 1; ok && i <= mask.dim(); ++i) {
    const SymInt m = mask.sym_size(-i), f = full[full.size() - i];
    ok = m == f || m == 1;
  }
  TORCH_CHECK(ok, "ring_attn: attn_mask shape ", tuple_str(mask.sym_sizes()),
              " does not broadcast to [..., L, S] = ", tuple_str(full));
  const at::Tensor e = mask.expand_symint(full);
  return batch.size() == 1 ? e : e.reshape_symint({product(batch), hq, lq, lk});
}

AttentionOptions options_of(const std::optional<at::Tensor>& attn_mask, double dropout_p,
                            bool is_causal, std::optional<double> scale, bool enable_gqa,
                            int64_t window_left, int64_t window_right, double softcap) {
  return AttentionOptions()
      .attn_mask(attn_mask)
      .dropout_p(dropout_p)
      .is_causal(is_causal)
      .scale(scale)
      .enable_gqa(enable_gqa)
      .window_left(window_left)
      .window_right(window_right)
      .softcap(softcap);
}

// ring_attn::sdpa (schema in csrc/ring_attn.cpp). seed None with dropout_p > 0: drawn
// here, after the checks, with draw_dropout_seed (the Python package's draw_seed), so a
// refused call leaves torch's generator untouched.
at::Tensor sdpa(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                std::optional<double> scale, bool enable_gqa, int64_t window_left,
                int64_t window_right, double softcap, const std::optional<at::Tensor>& seed) {
  const AttentionOptions o = options_of(attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                        window_left, window_right, softcap);
  validate(query, key, value, o);
  const SymVec batch = batch_shape(query, key, value);
  const auto [hq, hkv] = head_counts(query, key, value, enable_gqa);
  const at::Tensor q4 = to_4d(query, batch, hq);
  const at::Tensor k4 = to_4d(key, batch, hkv);
  const at::Tensor v4 = to_4d(value, batch, hkv);
  const SymInt lq = q4.sym_size(2), lk = k4.sym_size(2);
  std::optional<at::Tensor> mask4;
  if (attn_mask.has_value()) mask4 = mask_to_4d(*attn_mask, batch, hq, lq, lk);
  double s = 1.0;
  if (scale.has_value()) {
    s = *scale;
  } else {
    // The kernels take the scale as a number: a symbolic head dim is specialised here,
    // as Python's float(1 / math.sqrt(E)) would.
    const int64_t e = query.sym_size(-1).guard_int(__FILE__, __LINE__);
    s = e > 0 ? 1.0 / std::sqrt(static_cast<double>(e)) : 1.0;
  }
  BlockOptions b;
  b.attn_mask(mask4)
      .is_causal(is_causal)
      .scale(s)
      .dropout_p(dropout_p)
      .window_left(window_left)
      .window_right(window_right)
      .softcap(softcap);
  if (dropout_p > 0.0) b.seed(seed.has_value() ? *seed : draw_dropout_seed());
  const at::Tensor out = std::get<0>(attn_fwd(q4, k4, v4, b));
  // Output rank is the largest input rank, as with torch's broadcasting matmuls.
  SymVec full = batch;
  full.insert(full.end(), {hq, lq, value.sym_size(-1)});
  const int64_t rank = std::max({query.dim(), key.dim(), value.dim()});
  const size_t drop = full.size() > size_t(rank) ? full.size() - size_t(rank) : 0;
  return out.reshape_symint(c10::SymIntArrayRef(full).slice(drop));
}

// ring_attn::_sdpa_check: the argument rules of sdpa alone, raising as sdpa would.
void sdpa_check(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                const std::optional<at::Tensor>& attn_mask, double dropout_p, bool is_causal,
                std::optional<double> scale, bool enable_gqa, int64_t window_left,
                int64_t window_right, double softcap) {
  validate(query, key, value, options_of(attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                         window_left, window_right, softcap));
  head_counts(query, key, value, enable_gqa);
}

}  // namespace

TORCH_LIBRARY_IMPL(ring_attn, CompositeImplicitAutograd, m) {
  m.impl("sdpa", &sdpa);
  m.impl("_sdpa_check", &sdpa_check);
}

}  // namespace ring_attn
