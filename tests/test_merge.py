"""ring_attn.merge: partial (out, lse) over disjoint key sets, computed with plain torch
math in float64, merge into the attention over all keys; empty rows stay (0, -inf)."""
from __future__ import annotations

import math

import torch

from ring_attn.merge import merge, merge_


def _partial(q, k, v, keep):
    """Attention of q over the keys where keep is True: (out, lse); empty rows (0, -inf)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return p @ v, lse


def test_merge_of_key_subsets_is_full_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 7, 8, dtype=torch.float64, generator=g)
    k = torch.randn(2, 3, 20, 8, dtype=torch.float64, generator=g)
    v = torch.randn(2, 3, 20, 5, dtype=torch.float64, generator=g)
    full_out, full_lse = _partial(q, k, v, torch.ones(7, 20, dtype=torch.bool))
    owner = torch.randint(0, 4, (20,), generator=g)  # 4 disjoint, interleaved key subsets
    parts = [_partial(q, k, v, (owner == i).expand(7, 20)) for i in range(4)]
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        acc_out, acc_lse = parts[order[0]][0].clone(), parts[order[0]][1].clone()
        for i in order[1:]:
            merge_(acc_out, acc_lse, *parts[i])
        torch.testing.assert_close(acc_out, full_out, rtol=0, atol=1e-13)
        torch.testing.assert_close(acc_lse, full_lse, rtol=0, atol=1e-13)


def test_empty_rows_stay_zero_without_nan() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 1, 4, 4, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 6, 4, dtype=torch.float64, generator=g)
    v = torch.randn(1, 1, 6, 3, dtype=torch.float64, generator=g)
    keep_a = torch.zeros(4, 6, dtype=torch.bool)
    keep_a[1, :3] = True      # row 1 has keys in a only, row 2 in b only, rows 0, 3 none
    keep_b = torch.zeros(4, 6, dtype=torch.bool)
    keep_b[2, 3:] = True
    out, lse = merge(*_partial(q, k, v, keep_a), *_partial(q, k, v, keep_b))
    ref_out, ref_lse = _partial(q, k, v, keep_a | keep_b)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-14)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    torch.testing.assert_close(lse[..., 1:3], ref_lse[..., 1:3], rtol=0, atol=1e-14)
    assert (out[..., 0, :] == 0).all() and (out[..., 3, :] == 0).all()


def test_large_lse_no_overflow_and_float32_accumulation() -> None:
    # Scores near 1e4 would overflow exp(lse) in any dtype: weights are relative to max.
    # out accumulates in float32, lse in float64 (as the kernels return it).
    out_a, out_b = torch.randn(3, 4), torch.randn(3, 4)
    lse_a = torch.tensor([1e4, -1e4, 0.0])
    lse_b = torch.tensor([1e4 + math.log(3.0), -1e4, float("-inf")])
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    assert out.dtype == torch.float32 and lse.dtype == torch.float64
    # Expected weights from the float32 values actually stored (1e4 + log 3 rounds).
    w_b = torch.sigmoid(lse_b.double() - lse_a.double()).float()
    w = torch.stack([1 - w_b, w_b], 1)
    assert abs(float(w[0, 1]) - 0.75) < 1e-3
    torch.testing.assert_close(out, w[:, :1] * out_a + w[:, 1:] * out_b, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(lse).all()
    # bf16 partials merge in float32: the accumulator keeps float32's precision.
    acc, acc_lse = merge(out_a, lse_a, out_b.bfloat16(), lse_b)
    assert acc.dtype == torch.float32


def test_saturated_rows_keep_log_n() -> None:
    # Rows masked entirely by a huge finite value (-1e9): block lse = -1e9 + log(n_b).
    # The merged lse is -1e9 + log(n_a + n_b) and the weights n_a / (n_a + n_b); in
    # float32 both lse would round to -1e9 and the weights to 1/2.
    n_a, n_b = 3.0, 45.0
    out_a, out_b = torch.ones(1, 2), torch.zeros(1, 2)
    lse_a = torch.tensor([-1e9 + math.log(n_a)], dtype=torch.float64)
    lse_b = torch.tensor([-1e9 + math.log(n_b)], dtype=torch.float64)
    out, lse = merge(out_a, lse_a, out_b, lse_b)
    assert lse.dtype == torch.float64
    assert abs(float(lse[0]) - (-1e9 + math.log(n_a + n_b))) < 3e-7  # float64 ulp 1.2e-7
    torch.testing.assert_close(out, torch.full((1, 2), n_a / (n_a + n_b)), rtol=1e-6, atol=0)


def _math_partial(q, k, v, mask, keys):
    """torch's math backend on the key subset `keys` (index tensor), additive mask:
    (out, lse) with NaN wherever math gives NaN; an all -inf row gives (0, -inf)
    (math's safe softmax), and 0 * NaN in p @ v stays NaN. lse is NaN for a row with a
    +inf score, as the kernels return it (the row's probabilities are inf / inf = NaN)."""
    s = (q @ k[..., keys, :].transpose(-1, -2)) / math.sqrt(q.size(-1)) + mask[..., keys]
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.unsqueeze(-1))
    lse = torch.where(torch.isposinf(s).any(-1), float("nan"), lse)
    p = torch.where((lse == float("-inf")).unsqueeze(-1), torch.zeros_like(p), p)
    return p @ v[..., keys, :], lse


def test_merge_propagates_nan_and_inf_as_math() -> None:
    """A NaN partial row gives a NaN row, a NaN in one value column stays in that column
    (also from a block whose row is all masked), -inf rows stay (0, -inf) without NaN,
    and a +inf score gives NaN: the merge of the blocks equals math on all keys."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 1, 6, 4, dtype=torch.float64, generator=g)
    k = torch.randn(1, 1, 8, 4, dtype=torch.float64, generator=g)
    v = torch.randn(1, 1, 8, 3, dtype=torch.float64, generator=g)
    mask = torch.zeros(6, 8, dtype=torch.float64)
    mask[4, :] = float("-inf")        # row 4: no key at all
    mask[5, 4:] = float("-inf")       # row 5: keys of block b all masked
    q[0, 0, 1, 2] = float("nan")      # row 1 NaN
    v[0, 0, 6, 1] = float("nan")      # column 1 NaN in every row (block b)
    k[0, 0, 2, 0] = float("inf")      # key 2: +-inf scores (block a)
    mask[3, 2] = float("nan")         # row 3 NaN through the mask
    full = _math_partial(q, k, v, mask, torch.arange(8))
    parts = [_math_partial(q, k, v, mask, torch.arange(i, i + 4)) for i in (0, 4)]
    for a, b in (parts, parts[::-1]):
        out, lse = merge(*a, *b)
        for name, ours, ref in (("out", out, full[0]), ("lse", lse, full[1])):
            assert torch.equal(ours.isnan(), ref.isnan()), (name, ours, ref)
            assert torch.equal(ours.isinf(), ref.isinf()), (name, ours, ref)
            fin = ref.isfinite()
            torch.testing.assert_close(ours[fin], ref[fin], rtol=0, atol=1e-14)
    assert out[0, 0, :, 1].isnan().all() and not out[0, 0, 4, [0, 2]].isnan().any()
    assert lse[0, 0, 4] == float("-inf")
