// The block ops and the merge, as a C++ ring would use them: key blocks computed
// separately on global positions, merged through the log-sum-exp, equal to attention over
// the whole sequence (torch's SDPA in float64); the backward op given the merged (out,
// lse) gives each block's share of the exact gradients.
#include <ring_attn/merge.h>
#include <ring_attn/ops.h>

#include <limits>

#include "reference.h"

namespace {

using ring_attn::BlockOptions;
using ring_attn_test::expect_close_to_ref;
using ring_attn_test::max_abs_err;

// log sum_j exp(scale * q.k_j) over the causally visible keys, in float64.
at::Tensor reference_lse(const at::Tensor& q, const at::Tensor& k, double scale, bool causal) {
  at::Tensor s = at::matmul(q.to(at::kDouble), k.to(at::kDouble).transpose(-2, -1)) * scale;
  if (causal) {
    const auto L = q.size(2), S = k.size(2);
    const at::Tensor hide = torch::ones({L, S}, at::kBool).triu(1);
    s = s.masked_fill(hide, -std::numeric_limits<double>::infinity());
  }
  return at::logsumexp(s, -1);
}

TEST(OpsMerge, KeyBlocksMergeIntoFullAttention) {
  const int64_t B = 2, H = 3, S = 48, D = 32, blocks = 3, n = S / blocks;
  const double scale = 1.0 / std::sqrt(double(D));
  for (auto dt : {at::kFloat, at::kBFloat16, at::kDouble}) {
    torch::manual_seed(3);
    const at::Tensor q = torch::randn({B, H, S, D}, at::kDouble);
    const at::Tensor k = torch::randn({B, H, S, D}, at::kDouble);
    const at::Tensor v = torch::randn({B, H, S, D}, at::kDouble);
    const at::Tensor qd = q.to(dt), kd = k.to(dt), vd = v.to(dt);
    const bool wide = dt != at::kDouble;  // partials in float32; float64 stays (block.py)
    // Blocks in reverse order, like a ring step that sees the last keys first; block 2
    // alone leaves queries 0..31 with no visible key (lse = -inf), which the merge keeps.
    at::Tensor acc_out, acc_lse;
    for (int64_t b = blocks - 1; b >= 0; --b) {
      auto [out, lse] = ring_attn::attn_fwd(
          qd, kd.narrow(2, b * n, n), vd.narrow(2, b * n, n),
          BlockOptions().is_causal(true).scale(scale).k_offset(b * n), wide);
      EXPECT_EQ(lse.scalar_type(), at::kDouble);
      if (!acc_out.defined()) {
        acc_out = out;
        acc_lse = lse;
        EXPECT_TRUE(at::all(lse.narrow(2, 0, 2 * n).isneginf()).item<bool>());
        EXPECT_TRUE(at::all(out.narrow(2, 0, 2 * n) == 0).item<bool>());
      } else {
        ring_attn::merge_(acc_out, acc_lse, out, lse);
      }
    }
    const at::Tensor ref = at::scaled_dot_product_attention(q, k, v, {}, 0.0, true);
    const at::Tensor theirs = at::scaled_dot_product_attention(qd, kd, vd, {}, 0.0, true);
    expect_close_to_ref(acc_out, theirs, ref, 4.0, "merged out");
    // lse in float64 from dt inputs: against the lse of the same rounded inputs.
    EXPECT_LT(max_abs_err(acc_lse, reference_lse(qd, kd, scale, true)), 1e-5);
    EXPECT_EQ(acc_out.scalar_type(), wide ? at::kFloat : at::kDouble);
    if (dt == at::kDouble) {
      // float64: the merged blocks equal one call to rounding (bf16 and fp32 differ by
      // their kernels' per-block rounding of P, covered by the bound above).
      auto [full, full_lse] = ring_attn::attn_fwd(qd, kd, vd,
                                                  BlockOptions().is_causal(true).scale(scale));
      EXPECT_LT(max_abs_err(acc_out, full), 1e-12);
      EXPECT_LT(max_abs_err(acc_lse, full_lse), 1e-12);
    }
  }
}

TEST(OpsMerge, BlockBackwardsSumToTheFullGradients) {
  const int64_t S = 40, D = 16, n = 20;
  const double scale = 0.25;
  torch::manual_seed(4);
  const at::Tensor q = torch::randn({1, 4, S, D}, at::kDouble);
  const at::Tensor k = torch::randn({1, 2, S, D}, at::kDouble);  // GQA 4/2
  const at::Tensor v = torch::randn({1, 2, S, D}, at::kDouble);
  const at::Tensor dout = torch::randn({1, 4, S, D}, at::kDouble);
  auto [out, lse] = ring_attn::attn_fwd(q, k, v, BlockOptions().is_causal(true).scale(scale));
  at::Tensor dq = torch::zeros_like(q), dk = torch::zeros_like(k), dv = torch::zeros_like(v);
  for (int64_t b = 0; b < 2; ++b) {
    auto [gq, gk, gv] = ring_attn::attn_bwd(
        dout, q, k.narrow(2, b * n, n), v.narrow(2, b * n, n), out, lse, std::nullopt,
        BlockOptions().is_causal(true).scale(scale).k_offset(b * n));
    dq += gq;
    dk.narrow(2, b * n, n).copy_(gk);
    dv.narrow(2, b * n, n).copy_(gv);
  }
  const at::Tensor q1 = q.clone().requires_grad_(true), k1 = k.clone().requires_grad_(true);
  const at::Tensor v1 = v.clone().requires_grad_(true);
  const at::Tensor ref = at::scaled_dot_product_attention(q1, k1, v1, {}, 0.0, true, scale, true);
  auto g = torch::autograd::grad({ref}, {q1, k1, v1}, {dout});
  EXPECT_LT(max_abs_err(out, ref), 1e-12);
  EXPECT_LT(max_abs_err(dq, g[0]), 1e-12);
  EXPECT_LT(max_abs_err(dk, g[1]), 1e-12);
  EXPECT_LT(max_abs_err(dv, g[2]), 1e-12);
}

TEST(OpsMerge, EmptyRowsNaNAndViews) {
  const double inf = std::numeric_limits<double>::infinity();
  // Row 0: both sides empty -> out 0, lse -inf. Row 1: one side empty -> the other.
  // Row 2: equal lse -> the mean, lse + log 2. Row 3: NaN on one side propagates.
  at::Tensor out_a = torch::tensor({0.0, 1.0, 2.0, 3.0}, at::kDouble).view({4, 1});
  at::Tensor lse_a = torch::tensor({-inf, -inf, 0.5, std::nan("")}, at::kDouble);
  at::Tensor out_b = torch::tensor({0.0, 5.0, 4.0, 1.0}, at::kDouble).view({4, 1});
  at::Tensor lse_b = torch::tensor({-inf, 1.5, 0.5, 0.0}, at::kDouble);
  auto [out, lse] = ring_attn::merge(out_a, lse_a, out_b, lse_b);
  EXPECT_EQ(out[0].item<double>(), 0.0);
  EXPECT_TRUE(std::isinf(lse[0].item<double>()) && lse[0].item<double>() < 0);
  EXPECT_DOUBLE_EQ(out[1].item<double>(), 5.0);
  EXPECT_DOUBLE_EQ(lse[1].item<double>(), 1.5);
  EXPECT_DOUBLE_EQ(out[2].item<double>(), 3.0);
  EXPECT_DOUBLE_EQ(lse[2].item<double>(), 0.5 + std::log(2.0));
  EXPECT_TRUE(std::isnan(out[3].item<double>()) && std::isnan(lse[3].item<double>()));
  // Out of place keeps the accumulation dtype of out_a: bf16 partials merge in float32.
  auto [o16, l16] = ring_attn::merge(out_a.to(at::kBFloat16), lse_a, out_b, lse_b);
  EXPECT_EQ(o16.scalar_type(), at::kFloat);
  EXPECT_EQ(l16.scalar_type(), at::kDouble);
  // In place on narrowed rows of a larger accumulator: the other rows are untouched.
  at::Tensor acc = torch::full({6, 1}, 7.0, at::kDouble), acc_lse = torch::zeros({6}, at::kDouble);
  ring_attn::merge_(acc.narrow(0, 1, 4), acc_lse.narrow(0, 1, 4), out_b, lse_b);
  EXPECT_EQ(acc[0].item<double>(), 7.0);
  EXPECT_EQ(acc[5].item<double>(), 7.0);
  EXPECT_DOUBLE_EQ(acc_lse[1].item<double>(), 0.0);  // merged with -inf: unchanged
  EXPECT_DOUBLE_EQ(acc[1].item<double>(), 7.0);
  EXPECT_THROW(ring_attn::merge_(acc, acc_lse.to(at::kFloat), out_b, lse_b), c10::Error);
}

TEST(OpsMerge, SaturatedRowsNeedAGradient) {
  const at::Tensor lse = torch::tensor({0.0, -1e10, -std::numeric_limits<double>::infinity()},
                                       at::kDouble).view({1, 3});
  at::Tensor dout = torch::zeros({1, 3, 2});
  EXPECT_FALSE(ring_attn::saturated_rows(lse, dout).item<bool>());  // no gradient there
  dout.index_put_({0, 2}, 1.0);  // the -inf row: not this rule's case
  EXPECT_FALSE(ring_attn::saturated_rows(lse, dout).item<bool>());
  dout.index_put_({0, 1}, 1.0);
  EXPECT_TRUE(ring_attn::saturated_rows(lse, dout).item<bool>());
}

}  // namespace
