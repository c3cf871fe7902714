// ring_attn from C++: causal GQA attention in bfloat16, forward and backward, checked
// against at::scaled_dot_product_attention in float64 (error within 4x / 5x of torch's own
// bf16 error, as the test suite requires). Exit status 0 when it agrees, 1 otherwise.
#include <ring_attn/attention.h>
#include <torch/torch.h>

#include <cstdio>

namespace {

double max_err(const at::Tensor& x, const at::Tensor& ref) {
  return (x.to(at::kDouble) - ref.to(at::kDouble)).abs().max().item<double>();
}

struct Result {
  at::Tensor out, dq, dk, dv;
};

// Runs attention f on copies of (q, k, v) in dtype and backpropagates dout.
template <typename F>
Result fwd_bwd(F f, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& dout, at::ScalarType dtype) {
  // detach: fresh leaves each time (to(dtype) returns the tensor itself when it has dtype).
  auto q1 = q.to(dtype).detach().requires_grad_(true);
  auto k1 = k.to(dtype).detach().requires_grad_(true);
  auto v1 = v.to(dtype).detach().requires_grad_(true);
  at::Tensor out = f(q1, k1, v1);
  out.backward(dout.to(dtype));
  return {out.detach(), q1.grad(), k1.grad(), v1.grad()};
}

}  // namespace

int main() {
  torch::manual_seed(0);
  const int64_t B = 2, Hq = 8, Hk = 2, S = 256, D = 64;
  const at::Tensor q = torch::randn({B, Hq, S, D}, at::kDouble);
  const at::Tensor k = torch::randn({B, Hk, S, D}, at::kDouble);
  const at::Tensor v = torch::randn({B, Hk, S, D}, at::kDouble);
  const at::Tensor dout = torch::randn({B, Hq, S, D}, at::kDouble);

  auto ours = [](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    return ring_attn::scaled_dot_product_attention(
        a, b, c, ring_attn::AttentionOptions().is_causal(true).enable_gqa(true));
  };
  auto torch_sdpa = [](const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
    return at::scaled_dot_product_attention(a, b, c, {}, 0.0, /*is_causal=*/true,
                                            std::nullopt, /*enable_gqa=*/true);
  };
  const Result ref = fwd_bwd(torch_sdpa, q, k, v, dout, at::kDouble);
  const Result mine = fwd_bwd(ours, q, k, v, dout, at::kBFloat16);
  const Result theirs = fwd_bwd(torch_sdpa, q, k, v, dout, at::kBFloat16);

  std::printf("causal GQA attention, bf16, B=%ld Hq=%ld Hk=%ld S=%ld D=%ld\n", (long)B,
              (long)Hq, (long)Hk, (long)S, (long)D);
  std::printf("max |error| vs float64 SDPA   ring_attn   torch bf16\n");
  bool ok = true;
  const char* names[4] = {"out", "dq", "dk", "dv"};
  const at::Tensor* r[4] = {&ref.out, &ref.dq, &ref.dk, &ref.dv};
  const at::Tensor* m[4] = {&mine.out, &mine.dq, &mine.dk, &mine.dv};
  const at::Tensor* t[4] = {&theirs.out, &theirs.dq, &theirs.dk, &theirs.dv};
  for (int i = 0; i < 4; ++i) {
    const double e = max_err(*m[i], *r[i]), et = max_err(*t[i], *r[i]);
    const double factor = i == 0 ? 4.0 : 5.0;
    const bool pass = e <= factor * et + 1e-3;
    ok = ok && pass;
    std::printf("  %-27s %10.3e   %10.3e   %s\n", names[i], e, et, pass ? "ok" : "TOO LARGE");
  }
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
