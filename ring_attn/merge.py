"""Exact merge of partial attention results through the log-sum-exp.

A block's kernel returns out_b = softmax-weighted values over its keys and lse_b =
log sum_j exp(score_j) over the same keys. Two partials over disjoint key sets combine
into the attention over their union:

    lse = log(exp(lse_a) + exp(lse_b)) = m + log(w_a + w_b),  m = max(lse_a, lse_b),
    out = (w_a * out_a + w_b * out_b) / (w_a + w_b),           w_x = exp(lse_x - m)

Weights are computed relative to the running max, so nothing overflows. A row with no
key yet has lse = -inf (and out = 0); when both are -inf, m is replaced by 0 so the
weights are exp(-inf) = 0 instead of exp(nan), and the row stays out = 0, lse = -inf.

The out accumulator is float32 (float64 for float64 inputs) whatever the input dtype, so
a bf16 ring rounds its output once, at the end, not once per step. lse is float64 for
every dtype, as the kernels return it (csrc/common/attn_params.h): a row whose scores all
sit near a huge finite mask value (|lse| ~ 1e9..3e38) keeps its log(n) through the merge
(in float32, m + log(total) would round to m), and the weights exp(lse - m) are formed in
float64 and cast once to the out accumulator's dtype.
"""
from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers torch.ops.ring_attn.merge_ / _saturated_rows)

Tensor = torch.Tensor


# The dtype of every lse: kernels' outputs, the ring's accumulator, the merge.
LSE_DTYPE = torch.float64


# Beyond this |lse| a float64 lse no longer holds log(n) to float32 accuracy: its spacing
# is 2^(33-52) = 2^-19, so exp(S - lse) in the backward is off by up to 2^-20 relative
# (8 float32 ulps), and at |lse| ~ 3.4e38 (finfo(float32).min masks) by a factor of n.
# Only a huge finite additive mask (or a score beyond 8.6e9) gets a row there. The test
# itself is C++ (csrc/api/merge.cpp, kLseExactLimit), shared with the C++ API.
LSE_EXACT_LIMIT = 2.0 ** 33


def saturated_rows(lse: Tensor, dout: Tensor) -> Tensor:
    """0-D bool tensor (no host sync): some row with |lse| beyond LSE_EXACT_LIMIT gets a
    non-zero upstream gradient, so its backward would not be exact. Rows whose dout is 0
    (e.g. padding a loss ignores) contribute exactly 0 whatever their P, and pass; -inf
    (no key) and NaN rows are other rules' cases. The op ring_attn::_saturated_rows."""
    return torch.ops.ring_attn._saturated_rows.default(lse, dout)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of out for inputs of dtype: float64 stays, everything else
    float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """In place: (acc_out, acc_lse) <- merge of itself with (out, lse).

    acc_out [..., S, Dv] and acc_lse [..., S] (float64) may be views (narrowed rows of a
    larger accumulator); out is promoted to acc_out's dtype, lse to acc_lse's. The op
    ring_attn::merge_ (csrc/api/merge.cpp), the one implementation the C++ API shares."""
    torch.ops.ring_attn.merge_.default(acc_out, acc_lse, out, lse)


def merge(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Out-of-place merge: out in the accumulation dtype of out_a, lse in float64."""
    acc_out = out_a.to(acc_dtype(out_a.dtype), copy=True)
    acc_lse = lse_a.to(LSE_DTYPE, copy=True)
    merge_(acc_out, acc_lse, out_b, lse_b)
    return acc_out, acc_lse
