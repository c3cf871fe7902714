// Shared by the C++ tests: torch's SDPA as the reference, and the torch-style error-ratio
// check of tests/helpers.py (ours vs a float64 reference within a small multiple of
// torch's own error in the same dtype, plus an absolute floor for exact cases).
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

namespace ring_attn_test {

// tests/helpers.py ATOL_FLOOR, multiplied by max(1, max|ref|).
inline double atol_floor(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return 1e-12;
    case at::kFloat: return 1e-6;
    default: return 1e-3;
  }
}

// max |x - ref| over entries where both are finite (0 if none).
inline double max_abs_err(const at::Tensor& x, const at::Tensor& ref) {
  at::Tensor d = (x.detach().to(at::kDouble) - ref.detach().to(at::kDouble)).abs();
  d = d.masked_select(at::isfinite(d));
  return d.numel() ? d.max().item<double>() : 0.0;
}

// ours within factor x torch's error (both against ref) + the floor; non-finite entries
// must sit at the same places with the same values (NaN with NaN, +inf with +inf).
inline void expect_close_to_ref(const at::Tensor& ours, const at::Tensor& theirs,
                                const at::Tensor& ref, double factor, const std::string& what) {
  ASSERT_EQ(ours.sizes(), ref.sizes()) << what;
  const at::Tensor o = ours.detach().to(at::kDouble), r = ref.detach().to(at::kDouble);
  EXPECT_TRUE(at::equal(at::isnan(o), at::isnan(r))) << what << ": NaN pattern differs";
  EXPECT_TRUE(at::equal(at::isinf(o), at::isinf(r))) << what << ": inf pattern differs";
  const double scale = std::max(1.0, r.masked_select(at::isfinite(r)).abs().max().item<double>());
  const double err = max_abs_err(ours, ref), torch_err = max_abs_err(theirs, ref);
  const double bound = factor * torch_err + atol_floor(ours.scalar_type()) * scale;
  EXPECT_LE(err, bound) << what << ": ours " << err << " vs torch " << torch_err
                        << " (bound " << bound << ")";
}

// Forward and gradients of f over leaves (q, k, v) for a fixed upstream gradient.
struct FwdBwd {
  at::Tensor out, dq, dk, dv;
};

template <typename F>
FwdBwd run(F&& f, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           at::ScalarType dtype, const at::Tensor& dout) {
  at::Tensor q1 = q.to(dtype).detach().requires_grad_(true);
  at::Tensor k1 = k.to(dtype).detach().requires_grad_(true);
  at::Tensor v1 = v.to(dtype).detach().requires_grad_(true);
  at::Tensor out = f(q1, k1, v1);
  auto g = torch::autograd::grad({out}, {q1, k1, v1}, {dout.to(out.scalar_type())});
  return {out.detach(), g[0], g[1], g[2]};
}

}  // namespace ring_attn_test
