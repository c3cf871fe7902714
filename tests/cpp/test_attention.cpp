// ring_attn::scaled_dot_product_attention (C++ API): forward and autograd gradients
// against torch's SDPA in float64, within a small multiple of torch's own error in the
// same dtype (4x output, 5x gradients, as tests/test_sdpa_conformance.py).
#include <ring_attn/attention.h>

#include "reference.h"

namespace {

using ring_attn::AttentionOptions;
using ring_attn_test::expect_close_to_ref;
using ring_attn_test::run;

struct Case {
  at::ScalarType dtype;
  std::vector<int64_t> q, k, v;   // shapes
  bool causal = false, gqa = false;
  std::optional<at::Tensor> mask;  // bool or float64 values; cast to the query dtype
  std::optional<double> scale = std::nullopt;
};

std::optional<at::Tensor> mask_as(const std::optional<at::Tensor>& m, at::ScalarType t) {
  if (!m.has_value() || m->scalar_type() == at::kBool) return m;
  return m->to(t);
}

// device: where ours, torch's same-dtype SDPA and the float64 reference (torch's SDPA in
// float64) run; masks are built on the CPU, so the CUDA cases take none.
void check(const Case& c, const std::string& what, c10::Device device = c10::kCPU) {
  torch::manual_seed(0);
  const auto on = at::TensorOptions().dtype(at::kDouble).device(device);
  const at::Tensor q = torch::randn(c.q, on), k = torch::randn(c.k, on);
  const at::Tensor v = torch::randn(c.v, on);
  auto ours_fn = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& d) {
    return ring_attn::scaled_dot_product_attention(
        a, b, d, AttentionOptions().attn_mask(mask_as(c.mask, a.scalar_type()))
                     .is_causal(c.causal).scale(c.scale).enable_gqa(c.gqa));
  };
  auto torch_fn = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& d) {
    return at::scaled_dot_product_attention(a, b, d, mask_as(c.mask, a.scalar_type()), 0.0,
                                            c.causal, c.scale, c.gqa);
  };
  const at::Tensor shape_probe = torch_fn(q, k, v);
  const at::Tensor dout = torch::randn(shape_probe.sizes(), on);
  const auto ref = run(torch_fn, q, k, v, at::kDouble, dout);
  const auto ours = run(ours_fn, q, k, v, c.dtype, dout);
  const auto theirs = run(torch_fn, q, k, v, c.dtype, dout);
  EXPECT_EQ(ours.out.scalar_type(), c.dtype) << what;
  EXPECT_EQ(ours.dq.scalar_type(), c.dtype) << what;
  expect_close_to_ref(ours.out, theirs.out, ref.out, 4.0, what + " out");
  expect_close_to_ref(ours.dq, theirs.dq, ref.dq, 5.0, what + " dq");
  expect_close_to_ref(ours.dk, theirs.dk, ref.dk, 5.0, what + " dk");
  expect_close_to_ref(ours.dv, theirs.dv, ref.dv, 5.0, what + " dv");
}

const at::ScalarType kDtypes[] = {at::kFloat, at::kBFloat16, at::kDouble};

TEST(Attention, PlainAndCausalEveryDtype) {
  for (auto dt : kDtypes) {
    for (bool causal : {false, true}) {
      check({dt, {2, 3, 37, 40}, {2, 3, 37, 40}, {2, 3, 37, 24}, causal},
            std::string(c10::toString(dt)) + (causal ? " causal" : " plain"));
    }
  }
}

TEST(Attention, CudaTensorsWhenBuiltWithCuda) {
  // Runs only where the library has CUDA kernels and a GPU is visible (not in CI, whose
  // build is CPU only): the same dispatcher path, CUDA tensors in and out.
  if (!ring_attn::has_kernel(c10::DeviceType::CUDA) || !torch::cuda::is_available()) {
    GTEST_SKIP() << "no CUDA kernels in this build or no GPU";
  }
  for (auto dt : {at::kBFloat16, at::kFloat}) {
    check({dt, {2, 8, 100, 128}, {2, 2, 100, 128}, {2, 2, 100, 128}, true, true},
          "cuda causal GQA", c10::Device(c10::kCUDA));
  }
}

TEST(Attention, CausalWithFewerQueriesIsTopLeftAligned) {
  for (auto dt : kDtypes) {
    check({dt, {1, 2, 9, 32}, {1, 2, 50, 32}, {1, 2, 50, 32}, true}, "causal Lq < S");
  }
}

TEST(Attention, GroupedQueryAttention) {
  for (auto dt : kDtypes) {
    check({dt, {2, 8, 33, 64}, {2, 2, 45, 64}, {2, 2, 45, 64}, true, true}, "GQA 8/2");
  }
}

TEST(Attention, MasksBoolAndAdditiveBroadcast) {
  torch::manual_seed(1);
  const at::Tensor bool_mask = torch::rand({2, 1, 21, 30}) > 0.3;        // per batch
  const at::Tensor add_mask = torch::randn({21, 30}, at::kDouble) * 2.0;  // 2-D, broadcast
  for (auto dt : kDtypes) {
    check({dt, {2, 3, 21, 16}, {2, 3, 30, 16}, {2, 3, 30, 16}, false, false, bool_mask},
          "bool mask");
    check({dt, {2, 3, 21, 16}, {2, 3, 30, 16}, {2, 3, 30, 16}, false, false, add_mask},
          "additive 2-D mask");
  }
}

TEST(Attention, BroadcastBatchAndHeadsAndScale) {
  // 5-D query against 3-D key/value: batch dims and the single K/V head broadcast.
  check({at::kFloat, {2, 3, 4, 11, 8}, {4, 13, 8}, {4, 13, 8}, false, false, std::nullopt, 0.3},
        "broadcast batch, scale 0.3");
  check({at::kDouble, {3, 11, 8}, {1, 13, 8}, {1, 13, 8}}, "3-D, one K/V head");
}

TEST(Attention, FullyMaskedRowsGiveZero) {
  at::Tensor mask = torch::rand({1, 1, 12, 20}) > 0.5;
  mask.index_put_({0, 0, 3}, false);  // rows 3 and 7: every key masked
  mask.index_put_({0, 0, 7}, false);
  for (auto dt : kDtypes) {
    check({dt, {2, 2, 12, 16}, {2, 2, 20, 16}, {2, 2, 20, 16}, false, false, mask},
          "fully masked rows");
    auto q = torch::randn({2, 2, 12, 16}).to(dt).requires_grad_(true);
    auto k = torch::randn({2, 2, 20, 16}).to(dt).requires_grad_(true);
    auto v = torch::randn({2, 2, 20, 16}).to(dt).requires_grad_(true);
    auto out = ring_attn::scaled_dot_product_attention(q, k, v, AttentionOptions().attn_mask(mask));
    out.sum().backward();
    EXPECT_TRUE(at::all(out.select(2, 3) == 0).item<bool>());
    EXPECT_TRUE(at::all(out.select(2, 7) == 0).item<bool>());
    EXPECT_TRUE(at::all(q.grad().select(2, 3) == 0).item<bool>());
    EXPECT_TRUE(at::all(at::isfinite(k.grad())).item<bool>());
  }
}

TEST(Attention, SlidingWindowEqualsItsBandMask) {
  // window (left, right) = (5, 2) on top-left aligned positions is the bool band mask
  // i - 5 <= j <= i + 2; torch's SDPA with that mask is the reference.
  const int64_t L = 29, S = 29, left = 5, right = 2;
  const at::Tensor i = torch::arange(L).unsqueeze(1), j = torch::arange(S).unsqueeze(0);
  const at::Tensor band = (j >= i - left).logical_and(j <= i + right);
  for (auto dt : kDtypes) {
    torch::manual_seed(2);
    const at::Tensor q = torch::randn({1, 2, L, 16}, at::kDouble);
    const at::Tensor k = torch::randn({1, 2, S, 16}, at::kDouble);
    const at::Tensor v = torch::randn({1, 2, S, 16}, at::kDouble);
    const at::Tensor dout = torch::randn({1, 2, L, 16}, at::kDouble);
    auto ours_fn = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& d) {
      return ring_attn::scaled_dot_product_attention(
          a, b, d, AttentionOptions().window_left(left).window_right(right));
    };
    auto torch_fn = [&](const at::Tensor& a, const at::Tensor& b, const at::Tensor& d) {
      return at::scaled_dot_product_attention(a, b, d, band);
    };
    const auto ref = run(torch_fn, q, k, v, at::kDouble, dout);
    const auto ours = run(ours_fn, q, k, v, dt, dout);
    const auto theirs = run(torch_fn, q, k, v, dt, dout);
    expect_close_to_ref(ours.out, theirs.out, ref.out, 4.0, "window out");
    expect_close_to_ref(ours.dq, theirs.dq, ref.dq, 5.0, "window dq");
    expect_close_to_ref(ours.dk, theirs.dk, ref.dk, 5.0, "window dk");
  }
}

TEST(Attention, DropoutSeedComesFromTheDefaultGenerator) {
  // The API draws its seed with draw_dropout_seed() right before the kernel call, as
  // ring_attn.functional.draw_seed does in Python: after the same manual_seed, the op
  // called with that seed gives the same output, bit for bit.
  const at::Tensor q = torch::randn({1, 2, 40, 32}), k = torch::randn({1, 2, 40, 32});
  const at::Tensor v = torch::randn({1, 2, 40, 32});
  torch::manual_seed(123);
  const at::Tensor ours = ring_attn::scaled_dot_product_attention(
      q, k, v, AttentionOptions().dropout_p(0.3).is_causal(true));
  torch::manual_seed(123);
  const at::Tensor seed = ring_attn::draw_dropout_seed();
  const auto [direct, lse] = ring_attn::attn_fwd(
      q, k, v, ring_attn::BlockOptions().is_causal(true).scale(1.0 / std::sqrt(32.0))
                   .dropout_p(0.3).seed(seed));
  EXPECT_TRUE(at::equal(ours, direct));
  const at::Tensor plain = ring_attn::scaled_dot_product_attention(
      q, k, v, AttentionOptions().is_causal(true));
  EXPECT_FALSE(at::allclose(ours, plain));  // dropout did drop something
  torch::manual_seed(124);
  const at::Tensor other = ring_attn::scaled_dot_product_attention(
      q, k, v, AttentionOptions().dropout_p(0.3).is_causal(true));
  EXPECT_FALSE(at::equal(ours, other));  // another seed, another mask
}

TEST(Attention, DropoutGradientsMatchTheKeptMask) {
  // With dropout the reference is attention with the kernel's own keep-mask applied:
  // recover it from the output of V = identity columns (out = P_dropped @ I = P_dropped),
  // then check the gradients against that reference in float64.
  const int64_t L = 24, S = 24;
  torch::manual_seed(5);
  const at::Tensor q = torch::randn({1, 1, L, 16}, at::kDouble);
  const at::Tensor k = torch::randn({1, 1, S, 16}, at::kDouble);
  const at::Tensor eye = torch::eye(S, at::kDouble).view({1, 1, S, S});
  torch::manual_seed(9);
  const at::Tensor p_dropped = ring_attn::scaled_dot_product_attention(
      q, k, eye, AttentionOptions().dropout_p(0.25));
  const at::Tensor v = torch::randn({1, 1, S, 8}, at::kDouble).requires_grad_(true);
  const at::Tensor q1 = q.clone().requires_grad_(true), k1 = k.clone().requires_grad_(true);
  torch::manual_seed(9);
  at::Tensor out = ring_attn::scaled_dot_product_attention(q1, k1, v,
                                                           AttentionOptions().dropout_p(0.25));
  EXPECT_TRUE(at::allclose(out, at::matmul(p_dropped, v), 1e-10, 1e-12));
  // Reference: softmax, then the same keep pattern scaled by 1 / (1 - p).
  const at::Tensor keep = p_dropped != 0;
  const at::Tensor q2 = q.clone().requires_grad_(true), k2 = k.clone().requires_grad_(true);
  const at::Tensor v2 = v.detach().clone().requires_grad_(true);
  const at::Tensor p = at::softmax(at::matmul(q2, k2.transpose(-2, -1)) / std::sqrt(16.0), -1);
  const at::Tensor ref = at::matmul(p * keep / 0.75, v2);
  const at::Tensor go = torch::randn(ref.sizes(), at::kDouble);
  auto g = torch::autograd::grad({out}, {q1, k1, v}, {go});
  auto r = torch::autograd::grad({ref}, {q2, k2, v2}, {go});
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(at::allclose(g[i], r[i], 1e-9, 1e-11)) << i;
}

}  // namespace
