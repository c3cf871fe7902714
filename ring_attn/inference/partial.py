"""The one computation every inference strategy runs: the partial attention (out, lse) of
some new queries over the K/V rows one rank holds, and how a partial travels.

A rank's rows are [old | new]: the `n_old` rows it held before this call, all at global
positions below every new query (the cached prefix: every pair visible, so the kernel runs
without a rule), then the rows appended by this call at the positions `new_pos`, where
the kernel applies the causal rule on GLOBAL positions (query position map against key
position map), as block.py's ring steps do. The two kernel results merge exactly through
merge.py (out float32, float64 for float64 inputs; lse float64).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..comm import pack, unpack
from ..merge import LSE_DTYPE, acc_dtype, merge_

Tensor = torch.Tensor
Partial = tuple[Tensor, Tensor]  # (out [B, Hq, N, Dv] acc dtype, lse [B, Hq, N] float64)


def shard_partial(q: Tensor, q_pos: Tensor, k: Tensor, v: Tensor, n_old: int,
                  new_pos: Tensor, scale: float) -> Partial:
    """Attention of q (at global positions q_pos) over the rows k, v: rows [0, n_old)
    precede every query; rows n_old.. sit at new_pos, seen causally."""
    wide = q.dtype != torch.float64
    acc: Optional[Partial] = None
    if n_old > 0:
        acc = ops.attn_fwd(q, k.narrow(2, 0, n_old), v.narrow(2, 0, n_old), scale=scale,
                           out_fp32=wide)
    n_new = k.size(2) - n_old
    if n_new > 0:
        part = ops.attn_fwd(q, k.narrow(2, n_old, n_new), v.narrow(2, n_old, n_new), None,
                            q_pos, new_pos, is_causal=True, scale=scale, out_fp32=wide)
        if acc is None:
            acc = part
        else:
            merge_(acc[0], acc[1], *part)
    if acc is None:  # no rows here: out 0, lse -inf (merges as nothing)
        b, h, n = q.shape[:3]
        acc = (q.new_zeros((b, h, n, v.size(3)), dtype=acc_dtype(q.dtype)),
               q.new_full((b, h, n), float("-inf"), dtype=LSE_DTYPE))
    return acc


def merge_partials(parts: list[Partial]) -> Partial:
    """The exact merge of partials over disjoint keys, in list order (so every rank that
    merges the same list gets the same bits)."""
    out, lse = parts[0][0].clone(), parts[0][1].clone()
    for o, l in parts[1:]:
        merge_(out, lse, o, l)
    return out, lse


def partial_numel(b: int, h: int, n: int, dv: int, dtype: torch.dtype) -> int:
    """Elements of a packed partial in the accumulation dtype: lse is float64, i.e. one
    element of a float64 accumulator or two of a float32 one."""
    per_lse = 1 if acc_dtype(dtype) == torch.float64 else 2
    return b * h * n * (dv + per_lse)


def pack_partial(part: Partial) -> Tensor:
    """One buffer in out's dtype: lse's float64 bits first (8-byte aligned at offset 0,
    so it views back as float64), then out."""
    out, lse = part
    return pack([lse.contiguous().view(-1).view(out.dtype), out])


def unpack_partial(buf: Tensor, b: int, h: int, n: int, dv: int) -> Partial:
    per_lse = 1 if buf.dtype == torch.float64 else 2
    lse_bits, out = unpack(buf, [torch.Size((b * h * n * per_lse,)), torch.Size((b, h, n, dv))])
    return out, lse_bits.view(LSE_DTYPE).view(b, h, n)  # 1-D first: a 0-row view has odd strides
