// ring_attn C++ API: the exact merge of partial attention results through the
// log-sum-exp (the algebra is documented in ring_attn/merge.py, whose merge_ calls this
// one implementation through the op ring_attn::merge_).
//
//   lse = m + log(w_a + w_b),  out = (w_a out_a + w_b out_b) / (w_a + w_b),
//   w_x = exp(lse_x - m),      m = max(lse_a, lse_b)  (0 where both are -inf)
//
// Partials over disjoint key sets merge into the attention over their union; a row with
// no key on either side stays out = 0, lse = -inf; NaN propagates.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace ring_attn {

// In place: (acc_out, acc_lse) <- merge of itself with (out, lse). acc_out [..., S, Dv]
// (float32, or float64 for float64 inputs) and acc_lse [..., S] (float64) may be views,
// e.g. narrowed rows of a larger accumulator; out and lse are converted to their dtypes.
void merge_(const at::Tensor& acc_out, const at::Tensor& acc_lse, const at::Tensor& out,
            const at::Tensor& lse);

// Out of place: out in the accumulation dtype of out_a (float64 stays, else float32),
// lse in float64.
std::tuple<at::Tensor, at::Tensor> merge(const at::Tensor& out_a, const at::Tensor& lse_a,
                                         const at::Tensor& out_b, const at::Tensor& lse_b);

// 0-D bool tensor (no host sync): some row whose |lse| exceeds 2^33 (a row masked by a
// huge finite additive value) gets a non-zero upstream gradient, so its backward would not
// be exact; the backward of attention() refuses those (ring_attn.merge.saturated_rows).
at::Tensor saturated_rows(const at::Tensor& lse, const at::Tensor& dout);

}  // namespace ring_attn
