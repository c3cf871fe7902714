"""`varlen_attention`: packed variable-length documents on one device, flash-attn's
`flash_attn_varlen_func` interface over the ring_attn kernels.

Tokens of all documents are packed along dim 0, [T, H, D]; cu_seqlens_q / cu_seqlens_k
([0, L0, L0 + L1, ..., T], int32 or int64) give the document boundaries, and a query sees
only keys of its own document. The whole pack is ONE kernel call on [1, H, T, D] views
with the boundaries passed to the op: the kernels find each position's document by a
binary search, skip tiles whose queries and keys share no document and test elements
only on tiles that straddle a boundary, so nothing of size T^2 (no mask, no per-document
loop) is ever built. Autograd is the op's registered autograd (ring_attn/ops.py).

Causal alignment when a document has different query and key lengths: BOTTOM-RIGHT, as
flash-attn (>= 2.1) does and unlike torch's SDPA (top-left): in document d with Lq query
and Lk key tokens, query i (0-based within d) sees keys j <= i + Lk - Lq, so the last
query sees every key. When Lq > Lk the first Lq - Lk queries see no key and give 0.
The kernels compare positions in one coordinate system, so this is expressed by placing
both sides in a common one (`_bottom_right`): document d spans max(Lq, Lk) positions and
each side is right-aligned in it. With identical boundaries on both sides (self-attention,
the usual packed case) no position map is needed and none is built.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops
from .documents import check_cu_seqlens, check_max_seqlen
from .errors import RingAttnError
from .functional import check_bool, check_dropout_p, check_scale, check_tensor, draw_seed

Tensor = torch.Tensor
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_packed(q: Tensor, k: Tensor, v: Tensor) -> None:
    """[T, H, D] tensors, same dtype and device, GQA head counts, as flash-attn takes them."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
        if t.dim() != 3:
            raise RingAttnError(f"ring_attn: {name} must be 3-D [total_tokens, heads, head_dim]"
                                f" (packed documents), got {t.dim()}-D of shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOAT_DTYPES:
        raise RingAttnError("ring_attn: q, k and v must share one dtype of float32, float64, "
                            f"float16, bfloat16, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise RingAttnError("ring_attn: q, k and v must be on the same device, got "
                            f"q {q.device}, k {k.device}, v {v.device}")
    if k.shape[:2] != v.shape[:2]:
        raise RingAttnError(f"ring_attn: k and v must have the same [total_tokens, heads], got "
                            f"k {tuple(k.shape[:2])}, v {tuple(v.shape[:2])}")
    if k.shape[2] != q.shape[2]:
        raise RingAttnError(f"ring_attn: k head dim must equal q's {q.shape[2]}, got "
                            f"{k.shape[2]}")
    hq, hk = q.shape[1], k.shape[1]
    if hk == 0 or hq % hk != 0:
        raise RingAttnError(f"ring_attn: q heads ({hq}) must be a multiple of k/v heads ({hk})")


def _bottom_right(cu_q: tuple[int, ...], cu_k: tuple[int, ...], device: torch.device
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """(q_pos, k_pos, cu_common): every document d placed in a common coordinate system
    where it spans M_d = max(Lq_d, Lk_d) positions, with its queries and its keys each
    right-aligned in that span. Causal kpos <= qpos then keeps key j for query i iff
    j <= i + Lk_d - Lq_d (bottom-right), every position stays inside its document's span,
    and cu_common serves as the boundaries of both sides."""
    lq = torch.tensor(cu_q, dtype=torch.int64).diff()
    lk = torch.tensor(cu_k, dtype=torch.int64).diff()
    span = torch.maximum(lq, lk)
    cu_common = torch.cat([span.new_zeros(1), span.cumsum(0)])
    end = cu_common[1:]

    def right_aligned(lens: Tensor, total: int) -> Tensor:
        # Token t of document d (cu[d] <= t < cu[d + 1]) -> end[d] - cu[d + 1] + t.
        doc = torch.repeat_interleave(torch.arange(lens.numel()), lens, output_size=total)
        starts = lens.cumsum(0)
        return (end - starts)[doc] + torch.arange(total)

    q_pos = right_aligned(lq, cu_q[-1])
    k_pos = right_aligned(lk, cu_k[-1])
    return q_pos.to(device), k_pos.to(device), cu_common.to(device)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: Optional[int] = None,
                     max_seqlen_k: Optional[int] = None, *, is_causal: bool = False,
                     scale: Optional[float] = None, dropout_p: float = 0.0) -> Tensor:
    """Attention within packed documents: q [Tq, Hq, D], k [Tk, Hk, D], v [Tk, Hk, Dv] ->
    out [Tq, Hq, Dv] (contiguous, q's dtype), differentiable in q, k, v.

    cu_seqlens_q / cu_seqlens_k: int32 or int64 [n_docs + 1], cumulative document lengths
      from 0 to Tq / Tk, non-decreasing (a repeated value is an empty document), on q's
      device; the same number of documents on both sides.
    max_seqlen_q / max_seqlen_k: accepted for flash-attn compatibility and not needed;
      when given, each must be an int >= the longest document on its side (flash-attn
      sizes its grid with it, so a smaller value would be a silent error there).
    is_causal: bottom-right aligned within each document (see the module docstring).
    scale: None -> 1/sqrt(D). dropout_p: as scaled_dot_product_attention, with a seed
      drawn from torch's default generator.
    GQA: Hq a multiple of Hk; query head h reads K/V head h // (Hq // Hk).
    A query whose document has no visible key (an empty key document, or the first
    Lq - Lk queries under causal) gets 0, as flash-attn gives."""
    _check_packed(q, k, v)
    is_causal = check_bool("is_causal", is_causal)
    scale = check_scale(scale)
    dropout_p = check_dropout_p(dropout_p)
    cu_q = check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q", q.device)
    cu_k = check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k", q.device)
    if len(cu_q) != len(cu_k):
        raise RingAttnError("ring_attn: cu_seqlens_q and cu_seqlens_k must describe the same "
                            f"number of documents, got {len(cu_q) - 1} and {len(cu_k) - 1}")
    check_max_seqlen(max_seqlen_q, cu_q, "max_seqlen_q")
    check_max_seqlen(max_seqlen_k, cu_k, "max_seqlen_k")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[2]) if q.shape[2] > 0 else 1.0
    q_pos = k_pos = None
    if is_causal and cu_q != cu_k:
        q_pos, k_pos, cu_common = _bottom_right(cu_q, cu_k, q.device)
        cu_seqlens_q = cu_seqlens_k = cu_common
    seed = draw_seed() if dropout_p > 0.0 else None
    # [T, H, D] -> [1, H, T, D] views: the kernels take any b/h/s strides (d unit-stride).
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out, _ = ops.attn_fwd(q4, k4, v4, None, q_pos, k_pos, 0, 0, is_causal, float(scale),
                          dropout_p, seed, False, cu_seqlens_q, cu_seqlens_k)
    # flash-attn returns [T, H, Dv] contiguous; one copy of T*H*Dv, small beside the kernel.
    return out.squeeze(0).transpose(0, 1).contiguous()
