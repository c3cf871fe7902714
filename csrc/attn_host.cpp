#include "attn_host.h"

#include <cmath>
#include <initializer_list>
#include <limits>

#include "common/dropout_rng.h"
#include "common/visibility.h"

namespace ring_attn {
namespace {

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_qkv(const FwdArgs& a, c10::DeviceType device) {
  const at::Tensor* ts[3] = {&a.q, &a.k, &a.v};
  const char* names[3] = {"q", "k", "v"};
  for (int i = 0; i < 3; ++i) {
    TORCH_CHECK(ts[i]->dim() == 4, "ring_attn: ", names[i],
                " must be 4-D [B, H, S, D], got ", ts[i]->dim(), "-D of shape ", ts[i]->sizes());
    TORCH_CHECK(ts[i]->device().type() == device, "ring_attn: ", names[i], " must be on ",
                device, ", got ", ts[i]->device());
    TORCH_CHECK(ts[i]->scalar_type() == a.q.scalar_type(), "ring_attn: ", names[i],
                " dtype must match q's ", a.q.scalar_type(), ", got ", ts[i]->scalar_type());
    TORCH_CHECK(ts[i]->device() == a.q.device(), "ring_attn: ", names[i],
                " must be on q's device ", a.q.device(), ", got ", ts[i]->device());
  }
  TORCH_CHECK(is_float_dtype(a.q.scalar_type()),
              "ring_attn: q dtype must be float32, float64, float16 or bfloat16, got ",
              a.q.scalar_type());
  const auto B = a.q.size(0), Hq = a.q.size(1), D = a.q.size(3);
  const auto Hk = a.k.size(1), Sk = a.k.size(2);
  TORCH_CHECK(a.k.size(0) == B && a.v.size(0) == B, "ring_attn: batch sizes differ: q ", B,
              ", k ", a.k.size(0), ", v ", a.v.size(0));
  TORCH_CHECK(a.v.size(1) == Hk, "ring_attn: k and v head counts differ: k ", Hk, ", v ",
              a.v.size(1));
  TORCH_CHECK(Hk > 0 ? Hq % Hk == 0 : Hq == 0, "ring_attn: q heads (", Hq,
              ") must be a multiple of k/v heads (", Hk, ")");
  TORCH_CHECK(a.k.size(3) == D, "ring_attn: k head dim must equal q's ", D, ", got ",
              a.k.size(3));
  TORCH_CHECK(a.v.size(2) == Sk, "ring_attn: k and v lengths differ: k ", Sk, ", v ",
              a.v.size(2));
  TORCH_CHECK(a.dropout_p >= 0.0 && a.dropout_p < 1.0, "ring_attn: dropout_p must be in [0, 1), got ",
              a.dropout_p);
  TORCH_CHECK(std::isfinite(a.scale), "ring_attn: scale must be finite, got ", a.scale);
  TORCH_CHECK(a.window_left >= -1, "ring_attn: window_left must be >= 0, or -1 for "
              "unbounded, got ", a.window_left);
  TORCH_CHECK(a.window_right >= -1, "ring_attn: window_right must be >= 0, or -1 for "
              "unbounded, got ", a.window_right);
  TORCH_CHECK(std::isfinite(a.softcap) && a.softcap >= 0.0,
              "ring_attn: softcap must be finite and > 0, or 0 for off, got ", a.softcap);
  TORCH_CHECK(a.dropout_head_offset >= 0, "ring_attn: dropout_head_offset must be >= 0, got ",
              a.dropout_head_offset);
  TORCH_CHECK(a.cu_seqlens_q.has_value() == a.cu_seqlens_k.has_value(),
              "ring_attn: cu_seqlens_q and cu_seqlens_k must be given together, got ",
              a.cu_seqlens_q.has_value() ? "cu_seqlens_q only" : "cu_seqlens_k only");
}

// Last dim unit-stride for vectorised loads; other strides (including 0) are kept.
at::Tensor unit_last(const at::Tensor& t) {
  return (t.size(-1) <= 1 || t.stride(-1) == 1) ? t : t.contiguous();
}

void strides4(const at::Tensor& t, int64_t* s) {
  for (int i = 0; i < 4; ++i) s[i] = t.stride(i);
  if (t.size(3) <= 1) s[3] = 1;
}

at::Tensor prepare_pos(const std::optional<at::Tensor>& pos, int64_t len, const char* name,
                       const at::Tensor& q) {
  if (!pos.has_value()) return at::Tensor();
  const auto& p = *pos;
  TORCH_CHECK(p.dim() == 1 && p.size(0) == len, "ring_attn: ", name, " must have shape [", len,
              "], got ", p.sizes());
  TORCH_CHECK(!at::isFloatingType(p.scalar_type()) && p.scalar_type() != at::kBool,
              "ring_attn: ", name, " must be an integer tensor, got ", p.scalar_type());
  return p.to(q.device(), at::kLong).contiguous();
}

// The document of each of `len` positions (pos, or offset + i): the d with cu[d] <= pos <
// cu[d + 1], found by a binary search on the inputs' device (no host sync); -1 outside
// [cu[0], cu[-1]). Repeated cu values (empty documents) resolve to the non-empty one.
at::Tensor document_ids(const at::Tensor& cu, const at::Tensor& pos, int64_t offset,
                        int64_t len, const char* name, const at::Tensor& q) {
  TORCH_CHECK(cu.dim() == 1 && cu.size(0) >= 1, "ring_attn: ", name,
              " must be 1-D with at least one element (cumulative document lengths), got "
              "shape ", cu.sizes());
  TORCH_CHECK(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, "ring_attn: ",
              name, " must be int32 or int64, got ", cu.scalar_type());
  TORCH_CHECK(cu.device() == q.device(), "ring_attn: ", name, " must be on q's device ",
              q.device(), ", got ", cu.device());
  const at::Tensor c = cu.to(at::kLong).contiguous();
  if (c.is_cpu() && c.size(0) > 1) {
    // The host copy is free on CPU; on CUDA the Python entry points check it (one sync
    // per call there, not per kernel).
    TORCH_CHECK((c.diff() >= 0).all().item<bool>(), "ring_attn: ", name,
                " must be non-decreasing, got ", c);
  }
  const at::Tensor p = pos.defined() ? pos : at::arange(offset, offset + len, c.options());
  at::Tensor d = at::searchsorted(c, p, /*out_int32=*/false, /*right=*/true) - 1;
  d = at::where(p.ge(c.select(0, -1)), at::full({}, -1, d.options()), d);
  return d.to(at::kInt).contiguous();
}

// The accumulation dtype of the kernels: float64 for float64 inputs, float32 otherwise.
// delta and a floating mask are stored in it; lse is float64 for every dtype
// (attn_params.h, AttnFwdParams::lse).
at::ScalarType acc_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The mask stays a broadcast view: at most its own elements are converted (bool stays
// one byte, floating becomes the accumulation dtype), then expanded with stride 0.
// A float32 mask with float64 inputs is widened exactly, so the float64 kernels add the
// same values a float64 reference does.
at::Tensor prepare_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q,
                        int64_t Hq, int64_t Sk, AttnMaskParams& mp) {
  mp.kind = MaskKind::kNone;
  mp.ptr = nullptr;
  for (auto& s : mp.stride) s = 0;
  if (!mask.has_value()) return at::Tensor();
  at::Tensor m = *mask;
  TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
              "ring_attn: attn_mask dtype must be bool or floating, got ", m.scalar_type());
  TORCH_CHECK(m.device() == q.device(), "ring_attn: attn_mask must be on q's device ", q.device(),
              ", got ", m.device());
  TORCH_CHECK(m.dim() == 4, "ring_attn: attn_mask must be 4-D (broadcastable to [B, Hq, Sq, Sk]), got ",
              m.dim(), "-D of shape ", m.sizes());
  const std::vector<int64_t> full = {q.size(0), Hq, q.size(2), Sk};
  for (int i = 0; i < 4; ++i) {
    TORCH_CHECK(m.size(i) == full[i] || m.size(i) == 1, "ring_attn: attn_mask shape ", m.sizes(),
                " does not broadcast to [B, Hq, Sq, Sk] = ", at::IntArrayRef(full));
  }
  if (m.scalar_type() == at::kBool) {
    mp.kind = MaskKind::kBool;
  } else {
    mp.kind = MaskKind::kFloat;
    m = m.to(acc_dtype(q));
  }
  m = m.expand(full);
  for (int i = 0; i < 4; ++i) mp.stride[i] = full[i] == 1 ? 0 : m.stride(i);
  mp.ptr = m.data_ptr();
  return m;
}

// AttnMaskParams::nonfinite (attn_params.h): one byte on the inputs' device, nonzero when
// a value a skipped tile would read may be NaN or +-inf, computed with ATen ops and no
// host sync. `sums`: tensors where any non-finite element counts; their sum is non-finite
// iff an element is (inf + finite = inf, inf - inf = NaN, NaN propagates) or the sum
// overflows (a false positive: speed only). `maxes`: tensors that may hold -inf (a float
// mask, lse) but not NaN or +inf; at::maximum propagates NaN. Only calls with a band
// (causal, a window) or documents skip tiles, so the others pay nothing. Measured on the 2-core EPYC, one thread, S=4096,
// D=64, H=2: 0.13 ms for the whole flag against 50 ms for a causal float32 forward.
void fill_nonfinite(std::initializer_list<at::Tensor> sums,
                    std::initializer_list<at::Tensor> maxes, PreparedInputs& r,
                    AttnMaskParams& mp) {
  mp.nonfinite = nullptr;
  if (!has_visibility_rule(mp)) return;
  at::Tensor worst;  // max(|sum|, maxes...): below +inf iff nothing non-finite was seen
  for (const at::Tensor& t : sums) {
    // float16 sums in float32 (65504 is a small sum); the others in their own dtype,
    // whose range is float32's or more: bfloat16's own sum took 0.04 ms against 0.22 ms
    // for sum(dtype=float32) at [1, 2, 4096, 64] on one core.
    at::Tensor s = t.scalar_type() == at::kHalf ? t.sum(at::kFloat) : t.sum();
    s = s.to(t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
    worst = worst.defined() ? worst + s : s;
  }
  worst = worst.abs();
  for (const at::Tensor& t : maxes) {
    if (t.defined() && t.numel() > 0) worst = at::maximum(worst, t.amax().to(worst.scalar_type()));
  }
  r.nonfinite = worst.lt(std::numeric_limits<double>::infinity()).logical_not_();
  mp.nonfinite = static_cast<const uint8_t*>(r.nonfinite.data_ptr());  // bool: one byte, 0/1
}

// The elements a broadcast view reads: its stride-0 dims narrowed to one.
at::Tensor own_elements(const at::Tensor& t) {
  at::Tensor e = t;
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (t.stride(i) == 0 && t.size(i) > 1) e = e.narrow(i, 0, 1);
  }
  return e;
}

// What AttnFwdParams and AttnBwdParams share (same field names): shape, mask and
// positions, dropout, scale, and the q/k/v pointers and strides.
template <typename Params>
void fill_common(const FwdArgs& a, PreparedInputs& r, Params& p) {
  AttnShape& shape = p.shape;
  AttnMaskParams& mp = p.mask;
  DropoutParams& dp = p.dropout;
  shape = {a.q.size(0), a.q.size(1), a.k.size(1), a.q.size(2), a.k.size(2), a.q.size(3),
           a.v.size(3)};
  r.mask = prepare_mask(a.attn_mask, a.q, shape.Hq, shape.Sk, mp);
  r.q_pos = prepare_pos(a.q_pos, shape.Sq, "q_pos", a.q);
  r.k_pos = prepare_pos(a.k_pos, shape.Sk, "k_pos", a.q);
  mp.q_pos = r.q_pos.defined() ? r.q_pos.data_ptr<int64_t>() : nullptr;
  mp.k_pos = r.k_pos.defined() ? r.k_pos.data_ptr<int64_t>() : nullptr;
  mp.q_offset = a.q_offset;
  mp.k_offset = a.k_offset;
  mp.causal = a.is_causal;
  // Causal is the band's right bound 0 (its intersection with any window_right >= 0).
  mp.window_left = a.window_left;
  mp.window_right = a.is_causal ? 0 : a.window_right;
  mp.q_doc = nullptr;
  mp.k_doc = nullptr;
  if (a.cu_seqlens_q.has_value()) {
    r.q_doc = document_ids(*a.cu_seqlens_q, r.q_pos, a.q_offset, shape.Sq, "cu_seqlens_q", a.q);
    r.k_doc = document_ids(*a.cu_seqlens_k, r.k_pos, a.k_offset, shape.Sk, "cu_seqlens_k", a.q);
    mp.q_doc = r.q_doc.data_ptr<int32_t>();
    mp.k_doc = r.k_doc.data_ptr<int32_t>();
  }
  p.softcap = a.softcap;
  dp.p = a.dropout_p;
  dp.threshold = dropout_threshold(a.dropout_p);
  dp.seed = 0;
  dp.head_offset = a.dropout_head_offset;
  if (a.dropout_p > 0.0) {
    TORCH_CHECK(a.seed.has_value(), "ring_attn: seed is required when dropout_p > 0 (got dropout_p = ",
                a.dropout_p, " and no seed)");
    TORCH_CHECK(a.seed->numel() == 1 && !at::isFloatingType(a.seed->scalar_type()),
                "ring_attn: seed must be a one-element integer tensor, got shape ", a.seed->sizes(),
                " dtype ", a.seed->scalar_type());
    dp.seed = static_cast<uint64_t>(a.seed->item<int64_t>());
  }
  r.q = unit_last(a.q);
  r.k = unit_last(a.k);
  r.v = unit_last(a.v);
  p.q = r.q.data_ptr();
  p.k = r.k.data_ptr();
  p.v = r.v.data_ptr();
  strides4(r.q, p.q_stride);
  strides4(r.k, p.k_stride);
  strides4(r.v, p.v_stride);
  p.scale = a.scale;
}

}  // namespace

PreparedFwd prepare_fwd(const FwdArgs& a, bool out_fp32, c10::DeviceType device) {
  check_qkv(a, device);
  PreparedFwd r;
  AttnFwdParams& p = r.params;
  fill_common(a, r, p);
  const auto& s = p.shape;
  const auto out_dtype = out_fp32 ? at::kFloat : a.q.scalar_type();
  r.out = at::empty({s.B, s.Hq, s.Sq, s.Dv}, a.q.options().dtype(out_dtype));
  r.lse = at::empty({s.B, s.Hq, s.Sq}, a.q.options().dtype(at::kDouble));  // every dtype
  p.out = r.out.data_ptr();
  p.lse = r.lse.data_ptr();
  const at::Tensor mask_values =
      p.mask.kind == MaskKind::kFloat ? own_elements(r.mask) : at::Tensor();
  fill_nonfinite({r.q, r.k, r.v}, {mask_values}, r, p.mask);
  return r;
}

PreparedBwd prepare_bwd(const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                        const std::optional<at::Tensor>& dlse, const FwdArgs& a,
                        bool grad_fp32, c10::DeviceType device) {
  check_qkv(a, device);
  const std::vector<int64_t> out_shape = {a.q.size(0), a.q.size(1), a.q.size(2), a.v.size(3)};
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(out_shape), "ring_attn: dout must have shape ",
              at::IntArrayRef(out_shape), ", got ", dout.sizes());
  TORCH_CHECK(out.sizes() == at::IntArrayRef(out_shape), "ring_attn: out must have shape ",
              at::IntArrayRef(out_shape), ", got ", out.sizes());
  const std::vector<int64_t> lse_shape = {a.q.size(0), a.q.size(1), a.q.size(2)};
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lse_shape), "ring_attn: lse must have shape ",
              at::IntArrayRef(lse_shape), ", got ", lse.sizes());
  const bool has_dlse = dlse.has_value() && dlse->defined();
  if (has_dlse) {
    TORCH_CHECK(dlse->sizes() == at::IntArrayRef(lse_shape), "ring_attn: dlse must have shape ",
                at::IntArrayRef(lse_shape), " (like lse), got ", dlse->sizes());
    TORCH_CHECK(at::isFloatingType(dlse->scalar_type()),
                "ring_attn: dlse must be a floating tensor, got ", dlse->scalar_type());
  }
  const char* names[4] = {"dout", "out", "lse", "dlse"};
  const at::Tensor* ts[4] = {&dout, &out, &lse, has_dlse ? &*dlse : nullptr};
  for (int i = 0; i < 4; ++i) {
    if (ts[i] == nullptr) continue;
    TORCH_CHECK(ts[i]->device() == a.q.device(), "ring_attn: ", names[i],
                " must be on q's device ", a.q.device(), ", got ", ts[i]->device());
  }
  PreparedBwd r;
  AttnBwdParams& p = r.params;
  fill_common(a, r, p);
  r.dout = unit_last(dout.to(a.q.scalar_type()));
  // lse in float64 (any floating lse is accepted and widened exactly from float32) and
  // delta_i = sum_d dout_id * out_id - dlse_i in the accumulation dtype.
  const auto acc = acc_dtype(a.q);
  r.lse = lse.to(at::kDouble).contiguous();
  at::Tensor delta = (dout.to(acc) * out.to(acc)).sum(-1);
  if (has_dlse) delta = delta - dlse->to(acc);
  r.delta = delta.contiguous();
  const auto g_dtype = grad_fp32 ? at::kFloat : a.q.scalar_type();
  r.dq = at::empty(a.q.sizes(), a.q.options().dtype(g_dtype));
  r.dk = at::empty(a.k.sizes(), a.k.options().dtype(g_dtype));
  r.dv = at::empty(a.v.sizes(), a.v.options().dtype(g_dtype));
  p.dout = r.dout.data_ptr();
  strides4(r.dout, p.dout_stride);
  p.lse = r.lse.data_ptr();
  p.delta = r.delta.data_ptr();
  p.dq = r.dq.data_ptr(); p.dk = r.dk.data_ptr(); p.dv = r.dv.data_ptr();
  // delta is non-finite wherever dout is (NaN * x = NaN, inf * 0 = NaN), so it stands in
  // for dout at a fraction of the cost.
  const at::Tensor mask_values =
      p.mask.kind == MaskKind::kFloat ? own_elements(r.mask) : at::Tensor();
  fill_nonfinite({r.q, r.k, r.v, r.delta}, {mask_values, r.lse}, r, p.mask);
  return r;
}

at::Tensor sum_kv_groups(const at::Tensor& per_q_head, int64_t hk) {
  const auto B = per_q_head.size(0), Hq = per_q_head.size(1);
  if (Hq == hk) return per_q_head;
  return per_q_head.view({B, hk, Hq / hk, per_q_head.size(2), per_q_head.size(3)}).sum(2);
}

}  // namespace ring_attn
