// The exact (out, lse) merge (algebra in csrc/include/ring_attn/merge.h and
// ring_attn/merge.py), registered as the op ring_attn::merge_ so the Python ring and C++
// callers run this one implementation.
#include "ring_attn/merge.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

namespace ring_attn {
namespace {

// Beyond this |lse| a float64 lse no longer holds log(n) to float32 accuracy: its spacing
// is 2^(33-52) = 2^-19, so exp(S - lse) in the backward is off by up to 2^-20 relative
// (8 float32 ulps). Only a huge finite additive mask gets a row there (merge.py).
constexpr double kLseExactLimit = 8589934592.0;  // 2^33

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace

void merge_(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& out,
            const at::Tensor& lse) {
  TORCH_CHECK(acc_lse.scalar_type() == at::kDouble,
              "ring_attn: merge_: acc_lse must be float64, got ", acc_lse.scalar_type());
  TORCH_CHECK(acc_out.dim() == acc_lse.dim() + 1 &&
                  acc_out.sizes().slice(0, acc_lse.dim()) == acc_lse.sizes(),
              "ring_attn: merge_: acc_out must have shape [*acc_lse.shape, Dv] = [",
              acc_lse.sizes(), ", Dv], got ", acc_out.sizes());
  TORCH_CHECK(out.sizes() == acc_out.sizes(), "ring_attn: merge_: out must have acc_out's shape ",
              acc_out.sizes(), ", got ", out.sizes());
  TORCH_CHECK(lse.sizes() == acc_lse.sizes(), "ring_attn: merge_: lse must have acc_lse's shape ",
              acc_lse.sizes(), ", got ", lse.sizes());
  const at::Tensor l = lse.to(acc_lse.scalar_type());
  at::Tensor m = at::maximum(acc_lse, l);
  m = at::where(m == -std::numeric_limits<double>::infinity(), at::zeros_like(m), m);
  const at::Tensor w_acc = at::exp(acc_lse - m);
  const at::Tensor w_new = at::exp(l - m);
  const at::Tensor total = w_acc + w_new;
  // total == 0 only where both lse are -inf: keep out = 0 there.
  const at::Tensor inv = at::where(total > 0, total.reciprocal(), at::zeros_like(total));
  acc_out.mul_((w_acc * inv).unsqueeze(-1).to(acc_out.scalar_type()));
  // addcmul_, not add_(out * w): no out-sized temporary (a float32 [B, H, S_local, Dv] per
  // ring step, 2 of the 10 q-shard-sized buffers at the ring forward's peak in bfloat16).
  acc_out.addcmul_(out.to(acc_out.scalar_type()),
                   (w_new * inv).unsqueeze(-1).to(acc_out.scalar_type()));
  acc_lse.copy_(m + at::log(total));
}

std::tuple<at::Tensor, at::Tensor> merge(const at::Tensor& out_a, const at::Tensor& lse_a,
                                         const at::Tensor& out_b, const at::Tensor& lse_b) {
  at::Tensor acc_out = out_a.to(acc_dtype(out_a.scalar_type()), false, /*copy=*/true);
  at::Tensor acc_lse = lse_a.to(at::kDouble, false, /*copy=*/true);
  merge_(acc_out, acc_lse, out_b, lse_b);
  return {acc_out, acc_lse};
}

at::Tensor saturated_rows(const at::Tensor& lse, const at::Tensor& dout) {
  // -inf (no key: P = 0 exactly) and NaN rows are other rules' cases, not this one's.
  const at::Tensor big = lse.abs().gt(kLseExactLimit).logical_and(at::isfinite(lse));
  return big.logical_and(dout.ne(0).any(-1)).any();
}

}  // namespace ring_attn

// Device-generic (ATen ops only): one registration serves CPU and CUDA tensors.
TORCH_LIBRARY_IMPL(ring_attn, CompositeExplicitAutograd, m) {
  m.impl("merge_", &ring_attn::merge_);
  m.impl("_saturated_rows", &ring_attn::saturated_rows);
}
