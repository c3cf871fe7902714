"""The ring in one process: P virtual ranks driving the real per-step code.

`simulated_ring_attention` shards full tensors with the real layout, then, step by step,
lets each virtual rank r compute the block the real schedule gives it against the K/V
shard it would hold (that of rank (r - t) mod P), through the same `forward_block` /
`backward_block` and merge as ring.py; only the transfers are replaced by indexing.
The dK/dV partials of each shard are added in the order the real ring adds them (the
owner's own, then each stream's accumulator summed in hop order), so the numerics match
the real ring's.

Use it to test the ring's numerics (any P, any layout) without a process group, on CPU
or CUDA tensors alike, and to measure how the error grows with P.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional

import torch

from .block import RingSpec, backward_block, forward_block
from .errors import SATURATED, RingAttnError, call_op, refuse_double_backward
from .functional import check_argument_types, check_bool, draw_seed
from .documents import check_cu_seqlens
from .layout import check_global_length, resolve_layout, shard_tensor, unshard_tensors
from .packing import check_packed_arguments, packed_plan
from .merge import acc_dtype, saturated_rows
from .validate import check_softcap, check_window, kv_nonfinite, rows_nonfinite

Tensor = torch.Tensor


def _mask_4d(mask: Tensor, b: int, h: int, s: int) -> Tensor:
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    for i, want in enumerate((b, h, s, s)):
        if m.size(i) not in (1, want) or (i == 3 and m.size(i) != want):
            raise RingAttnError(f"ring_attn: attn_mask shape {tuple(mask.shape)} does not "
                             f"broadcast to [B, Hq, S, S] = {[b, h, s, s]}")
    return m


class _SimulatedRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                specs: list[RingSpec]) -> Tensor:
        p, layout, cu = len(specs), specs[0].layout, specs[0].docs
        qs = [shard_tensor(q, r, p, layout, cu_seqlens=cu).contiguous() for r in range(p)]
        ks = [shard_tensor(k, r, p, layout, cu_seqlens=cu).contiguous() for r in range(p)]
        vs = [shard_tensor(v, r, p, layout, cu_seqlens=cu).contiguous() for r in range(p)]
        masks = [None if mask is None else
                 mask if mask.size(2) == 1 else shard_tensor(mask, r, p, layout)
                 for r in range(p)]
        if specs[0].visibility.has_rule:
            # Each virtual rank's flags, as validate.py agrees on them in the real ring.
            kv = tuple(bool(kv_nonfinite(ks[r], vs[r])) for r in range(p))
            rows = tuple(bool(rows_nonfinite(qs[r], masks[r])) for r in range(p))
            specs = [replace(sp, kv_nonfinite=kv, rows_nonfinite=rows) for sp in specs]
        accs: list = [None] * p
        for t in range(len(specs[0].schedule.steps)):
            for r in range(p):
                blk = specs[r].schedule.steps[t].blk
                accs[r] = forward_block(specs[r], blk, qs[r], ks[blk.source], vs[blk.source],
                                        masks[r], accs[r])
        outs = [acc[0].to(q.dtype) for acc in accs]
        lses = [acc[1] for acc in accs]  # float64, as ring.py saves it
        ctx.save_for_backward(*qs, *ks, *vs, *outs, *lses)
        ctx.masks, ctx.specs = masks, specs
        return unshard_tensors(outs, layout, cu_seqlens=cu)

    @staticmethod
    def backward(ctx: Any, dout: Tensor):
        refuse_double_backward()
        specs = ctx.specs
        p, layout = len(specs), specs[0].layout
        saved = ctx.saved_tensors
        qs, ks, vs, outs, lses = (saved[i * p:(i + 1) * p] for i in range(5))
        cu = specs[0].docs
        douts = [shard_tensor(dout, r, p, layout, cu_seqlens=cu) for r in range(p)]
        if bool(torch.stack([saturated_rows(lses[r], douts[r]) for r in range(p)]).any()):
            raise RingAttnError(SATURATED)
        if specs[0].visibility.has_rule:  # as ring.py's backward: non-finite dout or out
            bad = [bool(rows_nonfinite(qs[r], None, douts[r], outs[r])) for r in range(p)]
            rows = tuple(a or b for a, b in zip(specs[0].rows_nonfinite or (False,) * p, bad))
            if any(bad):
                specs = [replace(sp, rows_nonfinite=rows) for sp in specs]
        dt = acc_dtype(qs[0].dtype)
        dq = [torch.zeros(x.shape, dtype=dt, device=x.device) for x in qs]
        dk = [torch.zeros(x.shape, dtype=dt, device=x.device) for x in ks]
        dv = [torch.zeros(x.shape, dtype=dt, device=x.device) for x in vs]
        # The real ring's order of sums (ring.py, comm.GradTransit): dq over the hops in
        # order, then the own block (computed last); dK/dV: the owner's own partial,
        # then each stream's travelling accumulator (zeros + partials in hop order),
        # added to the owner's rows when it comes home, forward stream first.
        trips: dict = {}
        own: dict = {}
        hops = specs[0].schedule.hops
        for t in range(len(specs[0].schedule.steps)):
            for r in range(p):
                st = specs[r].schedule.steps[t]
                s = st.blk.source
                grads = backward_block(specs[r], st.blk, douts[r], qs[r], ks[s], vs[s],
                                       outs[r], lses[r], ctx.masks[r])
                if grads is None:
                    continue
                if st.hop == 0:
                    own[r] = grads
                    continue
                key = (t > hops[0], s)
                if key not in trips:
                    trips[key] = (st.acc, torch.zeros_like(dk[s].narrow(2, 0, st.acc.count)),
                                  torch.zeros_like(dv[s].narrow(2, 0, st.acc.count)))
                grads.add_to(dq[r], trips[key][1], trips[key][2], st.acc.start)
        for r, grads in own.items():
            grads.add_to(dq[r], dk[r], dv[r])
        for (_, s), (rows, tk, tv) in sorted(trips.items(), key=lambda item: item[0]):
            dk[s].narrow(2, rows.start, rows.count).add_(tk)
            dv[s].narrow(2, rows.start, rows.count).add_(tv)
        full = [unshard_tensors([g.to(qs[0].dtype) for g in gs], layout, cu_seqlens=cu)
                for gs in (dq, dk, dv)]
        return full[0], full[1], full[2], None, None


def simulated_ring_attention(query: Tensor, key: Tensor, value: Tensor, *, world_size: int,
                             layout: str = "zigzag", is_causal: bool = False,
                             scale: Optional[float] = None, attn_mask: Optional[Tensor] = None,
                             dropout_p: float = 0.0, seed: Optional[Tensor] = None,
                             window: Optional[tuple[int, int]] = None,
                             softcap: Optional[float] = None,
                             cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Attention of FULL tensors [B, Hq, S, D] / [B, Hk, S, D] / [B, Hk, S, Dv] computed as
    a ring of `world_size` virtual ranks would; returns the full output [B, Hq, S, Dv]
    (differentiable). attn_mask: bool or additive, broadcastable to [B, Hq, S, S].
    Dropout: seed (int64 scalar) defaults to draw_seed(), so with the same
    torch.manual_seed the output equals ring_attn.scaled_dot_product_attention's.
    window, softcap, cu_seqlens (global boundaries) and layout="auto": as ring_attention."""
    check_bool("is_causal", is_causal)
    window, softcap = check_window(window), check_softcap(softcap)
    dropout_p, scale = check_argument_types(query, key, value, attn_mask, dropout_p, False,
                                            scale, True)
    # The single-device entry's rules on values (csrc/api/attention.cpp), GQA allowed.
    call_op(torch.ops.ring_attn._sdpa_check.default, query, key, value, attn_mask, dropout_p,
            False, scale, True)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise RingAttnError(f"ring_attn: {name} must be 4-D [B, H, S, D], got {t.dim()}-D")
    if key.size(2) != query.size(2):
        raise RingAttnError("ring_attn: the ring is self-attention: key length must equal "
                         f"query's {query.size(2)}, got {key.size(2)}")
    if world_size < 1:
        raise RingAttnError(f"ring_attn: world_size must be >= 1, got {world_size}")
    s = query.size(2)
    layout = resolve_layout(layout, window, world_size, s, is_causal=is_causal)
    s_local = None
    if layout == "packed":
        check_packed_arguments(cu_seqlens, attn_mask)
        s_local = packed_plan(check_cu_seqlens(cu_seqlens, s, "cu_seqlens", query.device),
                              world_size).s_local
    else:
        check_global_length(s, world_size, layout)
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    mask = None if attn_mask is None else _mask_4d(attn_mask, query.size(0), query.size(1), s)
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed()
    docs = None
    if cu_seqlens is not None:
        docs = check_cu_seqlens(cu_seqlens, s, "cu_seqlens", query.device)
    specs = [RingSpec(r, world_size, layout, is_causal, scale, dropout_p,
                      seed if dropout_p > 0.0 else None, s_local or s // world_size,
                      window=window,
                      softcap=softcap, cu_seqlens=cu_seqlens if docs else None, docs=docs)
             for r in range(world_size)]
    return _SimulatedRing.apply(query, key, value, mask, specs)
