// Bad input to the C++ API: the exception type torch's own SDPA throws for the same input
// (c10::Error = RuntimeError, c10::IndexError, c10::NotImplementedError), and a message
// naming the argument with the expected and actual values.
#include <ring_attn/attention.h>

#include <functional>

#include "reference.h"

namespace {

using ring_attn::AttentionOptions;

enum class Kind { kNone, kError, kIndex, kNotImplemented, kType };

const char* name(Kind k) {
  switch (k) {
    case Kind::kNone: return "no exception";
    case Kind::kError: return "c10::Error";
    case Kind::kIndex: return "c10::IndexError";
    case Kind::kNotImplemented: return "c10::NotImplementedError";
    case Kind::kType: return "c10::TypeError";
  }
  return "?";
}

// The exception's kind and message; the subclasses are caught before c10::Error.
std::pair<Kind, std::string> outcome(const std::function<void()>& f) {
  try {
    f();
  } catch (const c10::IndexError& e) {
    return {Kind::kIndex, e.what_without_backtrace()};
  } catch (const c10::NotImplementedError& e) {
    return {Kind::kNotImplemented, e.what_without_backtrace()};
  } catch (const c10::TypeError& e) {
    return {Kind::kType, e.what_without_backtrace()};
  } catch (const c10::Error& e) {
    return {Kind::kError, e.what_without_backtrace()};
  }
  return {Kind::kNone, ""};
}

struct Inputs {
  at::Tensor q = torch::randn({2, 4, 8, 16}), k = torch::randn({2, 4, 10, 16});
  at::Tensor v = torch::randn({2, 4, 10, 12});
};

// Ours throws the kind torch throws for the same arguments, naming what `needle` says.
void expect_like_torch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const std::optional<at::Tensor>& mask, bool causal, bool gqa,
                       const std::string& needle) {
  const auto theirs = outcome([&] {
    at::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, std::nullopt, gqa);
  });
  const auto ours = outcome([&] {
    ring_attn::scaled_dot_product_attention(
        q, k, v, AttentionOptions().attn_mask(mask).is_causal(causal).enable_gqa(gqa));
  });
  ASSERT_NE(theirs.first, Kind::kNone) << "torch accepts this input: " << needle;
  EXPECT_EQ(ours.first, theirs.first) << needle << ": ours " << name(ours.first) << " ("
                                      << ours.second << "), torch " << name(theirs.first);
  EXPECT_NE(ours.second.find(needle), std::string::npos) << ours.second;
}

// Inputs torch lets through but we refuse (documented): c10::Error naming the argument.
void expect_refused(const std::function<void()>& f, const std::string& needle) {
  const auto ours = outcome(f);
  EXPECT_EQ(ours.first, Kind::kError) << needle << ": got " << name(ours.first);
  EXPECT_NE(ours.second.find(needle), std::string::npos) << ours.second;
}

TEST(Errors, ShapesDtypesAndMasksLikeTorch) {
  Inputs in;
  expect_like_torch(in.q, torch::randn({2, 4, 10, 8}), in.v, std::nullopt, false, false,
                    "key head dim must equal query's 16, got 8");
  expect_like_torch(in.q, in.k, torch::randn({2, 4, 9, 12}), std::nullopt, false, false,
                    "value length must equal key's 10, got 9");
  expect_like_torch(in.q, in.k.to(at::kDouble), in.v, std::nullopt, false, false,
                    "query, key and value must have the same dtype");
  expect_like_torch(in.q.to(at::kComplexFloat), in.k.to(at::kComplexFloat),
                    in.v.to(at::kComplexFloat), std::nullopt, false, false,
                    "query dtype must be one of float32, float64, float16, bfloat16");
  expect_like_torch(in.q.to(at::kInt), in.k.to(at::kInt), in.v.to(at::kInt), std::nullopt,
                    false, false, "query dtype must be one of");
  expect_like_torch(in.q, in.k, in.v, torch::ones({10}, at::kBool), false, false,
                    "attn_mask must be at least 2-D [..., L, S], got 1-D");
  expect_like_torch(in.q, in.k, in.v, torch::ones({8, 10}, at::kBool), true, false,
                    "attn_mask must be None when is_causal=True");
  expect_like_torch(in.q, in.k, in.v, torch::ones({8, 10}, at::kInt), false, false,
                    "attn_mask dtype must be bool, float32 or match query's torch.float32, got torch.int32");
  expect_like_torch(in.q, in.k, in.v, torch::ones({8, 7}, at::kBool), false, false,
                    "attn_mask shape (8, 7) does not broadcast to [..., L, S] = (2, 4, 8, 10)");
  const at::Tensor k2 = torch::randn({2, 2, 10, 16}), v2 = torch::randn({2, 2, 10, 12});
  expect_like_torch(in.q, k2, v2, std::nullopt, false, false,
                    "query has 4 heads but key/value have 2; pass enable_gqa=True");
  const at::Tensor k3 = torch::randn({2, 3, 10, 16}), v3 = torch::randn({2, 3, 10, 12});
  expect_like_torch(in.q, k3, v3, std::nullopt, false, true,
                    "query heads (4) must be a multiple of key/value heads (3)");
  expect_like_torch(in.q, torch::randn({3, 4, 10, 16}), torch::randn({3, 4, 10, 12}),
                    std::nullopt, false, false, "do not broadcast");
}

TEST(Errors, ValuesTorchLetsThroughAreRefused) {
  Inputs in;
  expect_refused([&] {
    ring_attn::scaled_dot_product_attention(in.q, in.k, in.v, AttentionOptions().dropout_p(1.0));
  }, "dropout_p must be in [0, 1), got 1");
  expect_refused([&] {
    ring_attn::scaled_dot_product_attention(in.q, in.k, in.v,
                                            AttentionOptions().scale(std::nan("")));
  }, "scale must be finite");
  expect_refused([&] {
    ring_attn::scaled_dot_product_attention(in.q, in.k, in.v, AttentionOptions().window_left(-2));
  }, "window bounds must be >= 0, or -1 for unbounded, got (-2, -1)");
  expect_refused([&] {
    ring_attn::scaled_dot_product_attention(in.q, in.k, in.v, AttentionOptions().softcap(-1.0));
  }, "softcap must be finite and > 0");
}

TEST(Errors, BlockOpsNameTheArgument) {
  Inputs in;
  expect_refused([&] { ring_attn::attn_fwd(in.q[0], in.k, in.v); },
                 "q must be 4-D [B, H, S, D], got 3-D");
  expect_refused([&] {
    ring_attn::attn_fwd(in.q, in.k, in.v, ring_attn::BlockOptions().dropout_p(0.1));
  }, "seed is required when dropout_p > 0");
  expect_refused([&] {
    ring_attn::attn_fwd(in.q, in.k, in.v, ring_attn::BlockOptions().q_pos(torch::arange(3)));
  }, "q_pos must have shape [8], got [3]");
  auto [out, lse] = ring_attn::attn_fwd(in.q, in.k, in.v);
  expect_refused([&] {
    ring_attn::attn_bwd(out, in.q, in.k, in.v, out, lse.narrow(2, 0, 4), std::nullopt);
  }, "lse must have shape [2, 4, 8], got [2, 4, 4]");
}

TEST(Errors, UnsupportedGradientsRaiseAtBackward) {
  Inputs in;
  const at::Tensor q = in.q.requires_grad_(true);
  // Double backward: the backward op has no derivative.
  at::Tensor out = ring_attn::scaled_dot_product_attention(q, in.k, in.v);
  auto g = torch::autograd::grad({out.sum()}, {q}, {}, /*retain_graph=*/true,
                                 /*create_graph=*/false);
  EXPECT_EQ(g[0].sizes(), q.sizes());
  expect_refused([&] {
    torch::autograd::grad({out.sum()}, {q}, {}, true, /*create_graph=*/true);
  }, "double backward (create_graph=True) is not supported");
  // A mask that requires grad.
  const at::Tensor mask = torch::zeros({8, 10}).requires_grad_(true);
  at::Tensor out2 = ring_attn::scaled_dot_product_attention(q, in.k, in.v,
                                                            AttentionOptions().attn_mask(mask));
  expect_refused([&] { out2.sum().backward(); },
                 "gradients with respect to attn_mask are not supported");
  // A row masked by finfo(float32).min everywhere receiving a gradient.
  const at::Tensor huge = torch::zeros({8, 10}).index_put_({0}, -3.4e38);
  at::Tensor out3 = ring_attn::scaled_dot_product_attention(q, in.k, in.v,
                                                            AttentionOptions().attn_mask(huge));
  expect_refused([&] { out3.sum().backward(); }, "|log-sum-exp| > 2^33");
}

}  // namespace
