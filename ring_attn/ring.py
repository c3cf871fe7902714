"""Pass-KV ring attention over torch.distributed, forward and backward.

Forward, on every rank r of P, with its query shard Q_r and K/V shard (K_r, V_r), over the
steps of its schedule (schedule.py: step 0 is the own block, then K/V hops along one or
two streams):

    for each step:
        post: send the K/V rows the next rank needs, receive the next step's (non-blocking;
              packed, KV heads only: GQA is never expanded on the wire)
        partial = kernel(Q_r rows, held K/V rows per the schedule)  (overlaps the transfer)
        merge partial into out (float32; float64 for float64) and lse (float64)
        wait; hold what arrived
    return out cast to the input dtype, once

Without a window the schedule is the classic ring: P - 1 hops of whole shards to r + 1.
With one, K/V travel only as far as some rank's window reaches, and only the rows it
reaches (contiguous layout, causal, window left: ceil(left / S_local) hops carrying the
last `left` rows of the nearest shard).

Backward (op ring_bwd, the autograd of op ring_fwd; the global out and lse saved by
forward make every block's probabilities final, so blocks are independent):

    dq = 0 (accumulation dtype, stays home); K/V travel as in forward, prefetched. The own
    block is computed last, after the ring steps, while the dK/dV hops home are in flight;
    its dK/dV stay home; each other shard's accumulator starts at its first hop,
    travels one step behind its K/V (received from the previous rank while this step
    computes its partial, the partial added, sent on), and when its K/V stop travelling
    the last rank sends it home to the owner at the end of the stream (for the classic
    ring: after P - 1 hops, one hop from r - 1 to r).

The schedule (which rows of which block, whether the block needs the visibility rule or
is skipped, which rows go where) is the pure function in schedule.py; the exchanges and
buffers are in comm.py; the per-step kernel call and merge are in block.py, shared with
the simulated ring (simulated.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist

from .block import RingSpec, backward_block, forward_block
from .comm import GradTransit, GroupInfo, HeldKV, RingComm, group_info
from .errors import SATURATED, RingAttnError, RingAttnException, refuse_double_backward
from .functional import (check_bool, check_dropout_p, check_mask_type, check_scale,
                         check_softcap, check_tensor, check_window)
from .layout import RING_LAYOUTS, check_layout
from .merge import acc_dtype, saturated_rows
from .profile import begin, recorder, span
from .validate import (Agreed, agree_on_backward, agree_on_inputs, bits_float, float_bits,
                       normalize_mask, rows_nonfinite)

Tensor = torch.Tensor


def ring_forward(spec: RingSpec, comm: Optional[RingComm], q: Tensor, k: Tensor, v: Tensor,
                 mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """This rank's attention over the whole ring: out in the accumulation dtype, lse in
    float64."""
    held = HeldKV(comm, k, v)
    acc = None
    rec = recorder()  # None unless profiling (profile.py)
    begin(rec, "fwd")
    for i, st in enumerate(spec.schedule.steps):
        pending = held.post(st)  # the next step's K/V, while this step computes
        with span(rec, "fwd", i, "compute"):
            acc = forward_block(spec, st.blk, q, *held.kv, mask, acc, st.held.start)
        with span(rec, "fwd", i, "wait"):
            held.advance(pending)
    return acc


def ring_backward(spec: RingSpec, comm: Optional[RingComm], dout: Tensor, q: Tensor,
                  k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's shards (dq, dk, dv) of the gradients, in the inputs' dtypes."""
    # Every rank must be in the backward of the same call (and none may ask for a double
    # backward) before any K/V moves: raises on every rank otherwise (validate.py).
    if comm is None:
        refuse_double_backward()
        if bool(saturated_rows(lse, dout)):
            raise RingAttnError(SATURATED)
    else:
        flags = agree_on_backward(comm.info, spec.call, dout, torch.is_grad_enabled(),
                                  rows_nonfinite(q, None, dout, out),
                                  saturated_rows(lse, dout))
        rows = tuple(a or b for a, b in zip(spec.rows_nonfinite or (False,) * len(flags),
                                            flags))
        if rows != spec.rows_nonfinite and any(rows):
            # A non-finite dout or out reaches every key's gradient (0 * NaN): compute
            # the blocks the forward skipped (and bring the K/V they read).
            spec = dataclasses.replace(spec, rows_nonfinite=rows)
    dq = torch.zeros(q.shape, dtype=acc_dtype(q.dtype), device=q.device)
    held = HeldKV(comm, k, v)
    grads = GradTransit(comm, k, v, dq.dtype)
    steps = spec.schedule.steps
    rec = recorder()
    begin(rec, "bwd")
    # The own block (step 0) is computed LAST: its K/V are this rank's inputs, its
    # partials final (the blocks of the backward are independent), so computing it
    # after the ring (a) overlaps the dK/dV hops home with compute, and (b) means the
    # own dK/dV sums (float32, a K/V pair) exist only at the end, not through every step:
    # 4 of the 25 q-shard-sized buffers at the bfloat16 backward's peak (P = 4;
    # benchmarks/results/ring_memory_accounting.md). The
    # price is the first K/V hop, waited for before any compute (2 q-shards of input
    # dtype, against the 2 float32 ones of the last dK/dV hop it replaces).
    for i, st in enumerate(steps):
        pending = held.post(st)
        if st.hop > 0:
            with span(rec, "bwd", i, "compute"):
                partial = backward_block(spec, st.blk, dout, q, *held.kv, out, lse, mask,
                                         st.held.start)
            with span(rec, "bwd", i, "wait"):
                dk_acc, dv_acc, first_row = grads.take(st)  # arrived while we computed
            if partial is not None:
                partial.add_to(dq, dk_acc, dv_acc, first_row)
                partial = None  # its float32 partials need not outlive the next kernel call
        if comm is not None:
            grads.pass_on(st, steps[i + 1] if i + 1 < len(steps) else None)
        with span(rec, "bwd", i, "wait"):
            held.advance(pending)
    with span(rec, "bwd", 0, "compute"):  # the own block: step 0's, computed last
        own = backward_block(spec, steps[0].blk, dout, q, k, v, out, lse, mask)
    # The own block is the whole shard, never skipped (schedule._block): its float32
    # dK/dV partials become the own sums as they are (no zeroed copy to add them to).
    dq.add_(own.dq)
    grads.own(own.dk, own.dv)
    own = None
    with span(rec, "bwd", len(steps), "wait"):
        dk, dv = grads.finish()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --- The ring as two opaque operators ------------------------------------------------
# The cross-rank agreement reads an all_gather result on the host, which torch.compile
# cannot trace: as plain Python the ring broke the graph there (a Llama under
# torch._dynamo.explain: 15 breaks, 9 with the call disabled). As custom ops
# (ring_attn::ring_fwd / ring_bwd, taking the group by name) the ring is one node of the
# graph, eager and compiled alike; the agreement and everything the backward needs from
# it travel in `state`, an int64 vector:
#   [call, seed?, seed, scale bits, dropout_p bits, layout, window?, left, right,
#    softcap bits, kv_nonfinite x P, rows_nonfinite x P, cu_seqlens' values if any]
# (the documents ride along so the backward needs no device-to-host copy of cu_seqlens)
_STATE = 10


def _group_of(name: str) -> Optional[dist.ProcessGroup]:
    """The process group named `name`; None for the world (comm.py's fast path)."""
    if name == dist.group.WORLD.group_name:
        return None
    return torch._C._distributed_c10d._resolve_process_group(name)


def _encode(agreed: Agreed) -> Tensor:
    seed = int(agreed.seed) if agreed.seed is not None else 0
    left, right = agreed.window if agreed.window is not None else (0, 0)
    return torch.tensor([agreed.call, int(agreed.seed is not None), seed,
                         float_bits(agreed.scale), float_bits(agreed.dropout_p),
                         RING_LAYOUTS.index(agreed.layout), int(agreed.window is not None),
                         left, right, float_bits(agreed.softcap),
                         *agreed.kv_nonfinite, *agreed.rows_nonfinite, *(agreed.docs or ())],
                        dtype=torch.int64)


def _spec(state: list[int], info: GroupInfo, q: Tensor, is_causal: bool,
          cu_seqlens: Optional[Tensor], head_offset: int) -> RingSpec:
    p = info.world_size
    docs = tuple(state[_STATE + 2 * p:]) if cu_seqlens is not None else None
    return RingSpec(info.rank, p, RING_LAYOUTS[state[5]], is_causal, bits_float(state[3]),
                    bits_float(state[4]),
                    torch.tensor(state[2], dtype=torch.int64) if state[1] else None,
                    q.size(2), tuple(bool(x) for x in state[_STATE:_STATE + p]),
                    tuple(bool(x) for x in state[_STATE + p:_STATE + 2 * p]), state[0],
                    (state[7], state[8]) if state[6] else None, bits_float(state[9]),
                    cu_seqlens, docs, head_offset)


@torch.library.custom_op("ring_attn::ring_fwd", mutates_args=())
def ring_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor],
             cu_seqlens: Optional[Tensor], dropout_seed: Optional[Tensor], is_causal: bool,
             scale: Optional[float], dropout_p: float, layout: str,
             window: Optional[list[int]], softcap: float, head_offset: int,
             group_name: str) -> tuple[Tensor, Tensor, Tensor]:
    """(out, lse float64, state) of this rank's shard: the agreement, then the ring."""
    info = group_info(_group_of(group_name))
    agreed = agree_on_inputs(q, k, v, attn_mask, is_causal=is_causal, scale=scale,
                             dropout_p=dropout_p, layout=layout, info=info,
                             window=tuple(window) if window is not None else None,
                             softcap=softcap, cu_seqlens=cu_seqlens, seed=dropout_seed)
    spec = RingSpec(info.rank, info.world_size, agreed.layout, is_causal, agreed.scale,
                    agreed.dropout_p, agreed.seed, q.size(2), agreed.kv_nonfinite,
                    agreed.rows_nonfinite, agreed.call, agreed.window, agreed.softcap,
                    cu_seqlens if agreed.docs is not None else None, agreed.docs,
                    head_offset)
    comm = RingComm(info) if info.world_size > 1 else None
    out, lse = ring_forward(spec, comm, q, k, v, agreed.mask)
    return out.to(q.dtype).contiguous(), lse.contiguous(), _encode(agreed)


@ring_fwd.register_fake
def _(q, k, v, attn_mask, cu_seqlens, dropout_seed, is_causal, scale, dropout_p, layout,
      window, softcap, head_offset, group_name):
    p = dist.get_world_size(_group_of(group_name))
    b, h, s = q.shape[:3]
    docs = cu_seqlens.size(0) if cu_seqlens is not None else 0
    return (q.new_empty((b, h, s, v.size(3))), q.new_empty((b, h, s), dtype=torch.float64),
            torch.empty(_STATE + 2 * p + docs, dtype=torch.int64))


@torch.library.custom_op("ring_attn::ring_bwd", mutates_args=())
def ring_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
             state: Tensor, attn_mask: Optional[Tensor], cu_seqlens: Optional[Tensor],
             is_causal: bool, head_offset: int, group_name: str,
             create_graph: bool) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's (dq, dk, dv) of the call that returned (out, lse, state)."""
    info = group_info(_group_of(group_name))
    spec = _spec(state.tolist(), info, q, is_causal, cu_seqlens, head_offset)
    mask = None
    if attn_mask is not None:
        mask = normalize_mask(attn_mask, q, q.size(2) * info.world_size)
    comm = RingComm(info) if info.world_size > 1 else None
    with torch.set_grad_enabled(create_graph):  # what the double-backward refusal reads
        grads = ring_backward(spec, comm, dout, q, k, v, out, lse, mask)
    return tuple(g.contiguous() for g in grads)  # the strides the fake promises


@ring_bwd.register_fake
def _(dout, q, k, v, out, lse, state, attn_mask, cu_seqlens, is_causal, head_offset,
      group_name, create_graph):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, mask, cu_seqlens, _, is_causal, *_, head_offset, group_name = inputs
    out, lse, state = output
    ctx.save_for_backward(q, k, v, out, lse, state, mask, cu_seqlens)
    ctx.is_causal, ctx.head_offset, ctx.group_name = is_causal, head_offset, group_name
    ctx.mark_non_differentiable(lse, state)


def _backward(ctx: Any, dout: Tensor, _dlse: Optional[Tensor], _dstate: Optional[Tensor]):
    q, k, v, out, lse, state, mask, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = ring_bwd(dout, q, k, v, out, lse, state, mask, cu_seqlens, ctx.is_causal,
                          ctx.head_offset, ctx.group_name, torch.is_grad_enabled())
    return (dq, dk, dv) + (None,) * 11


ring_fwd.register_autograd(_backward, setup_context=_setup_context)


def ring_attention(query: Tensor, key: Tensor, value: Tensor, *, is_causal: bool = False,
                   scale: Optional[float] = None, attn_mask: Optional[Tensor] = None,
                   dropout_p: float = 0.0, group: Optional[dist.ProcessGroup] = None,
                   layout: str = "zigzag", window: Optional[tuple[int, int]] = None,
                   softcap: Optional[float] = None,
                   cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """Exact attention over a sequence sharded across the ranks of `group`.

    Args:
      query: [B, Hq, S_local, D], this rank's shard of the queries in `layout`.
      key, value: [B, Hk, S_local, D] / [B, Hk, S_local, Dv], this rank's shards;
        Hk < Hq is grouped-query attention (Hq % Hk == 0); K/V are sent with Hk heads.
      is_causal: key at global position j is kept for query at i iff j <= i.
      scale: score scale, default 1/sqrt(D).
      attn_mask: this rank's queries against the FULL key sequence, [..., S_local, S]
        with S = P * S_local, bool (False masks out) or additive in the query dtype,
        broadcastable on batch and heads (and on queries: a [1, 1, 1, S] key-padding
        mask serves every rank). Key columns are in GLOBAL order, whatever the layout;
        query rows in this rank's local order. Each step reads the columns of the keys it
        holds. Memory O(S_local * S) per rank. May be combined with is_causal (both apply).
      dropout_p: dropout on the attention probabilities. The seed is drawn from torch's
        default generator with ring_attn.functional.draw_seed() on every rank and rank
        0's is used, so with the same torch.manual_seed the sharded output equals the
        single-device ring_attn.scaled_dot_product_attention output.
      group: the ring's process group (default: the world). gloo for CPU tensors, NCCL
        for CUDA tensors on the current device.
      layout: "zigzag" (default), "contiguous", "striped" (see ring_attn.layout) or
        "auto": ring_attn.layout.resolve_layout("auto", window, P, S, is_causal=is_causal),
        contiguous when the window lets K/V travel fewer hops, else zigzag. The inputs
        must be sharded with that same concrete layout: resolve it once with
        resolve_layout and pass the result to shard / positions / ring_attention.
      window: (left, right), flash-attn's sliding window on GLOBAL positions: key j is
        visible to query i iff i - left <= j <= i + right; -1 is unbounded on that side.
        Combined with is_causal (right bound 0), masks, documents, dropout, GQA. Blocks
        outside every query's window are skipped; with the contiguous layout K/V travel
        only ceil(left / S_local) hops (and ceil(right / S_local) the other way), and
        only the rows the window reaches (see ring_attn.schedule).
      softcap: Gemma 2's logit soft-capping, scores -> softcap * tanh(score / softcap)
        before the mask; None or 0 (default None) is off; else a finite float > 0.
      cu_seqlens: packed documents: int32/int64 [0, L0, L0 + L1, ..., S], the boundaries
        of the GLOBAL packed sequence (the same tensor on every rank, on the inputs'
        device); a token attends only within its document.

    Returns this rank's shard [B, Hq, S_local, Dv] of the exact attention output. Its
    backward gives this rank's shards of the exact gradients of sum over ranks of each
    rank's loss (the loss of the whole sequence when each rank's loss covers its shard).

    Before any transfer, one all_gather checks that every rank agrees on shapes, dtype,
    device type, layout, causal, scale, dropout, mask presence, window, softcap,
    cu_seqlens (length and a 64-bit hash) and the call's number in the group; a
    disagreement raises on every rank, naming the rank that differs. The backward starts
    with one more small all_gather: ranks in the backwards of different calls (a
    different backward order), or asking for a double backward (create_graph=True, not
    supported), raise on every rank before any K/V moves. One operator pair
    (ring_attn::ring_fwd / ring_bwd): torch.compile(fullgraph=True) traces through it.
    NaN/inf propagate as in torch's math backend on the full sequence (blocks of a
    non-finite K/V shard, or of non-finite query rows, are computed, not skipped).
    """
    return ring_attention_of_heads(query, key, value, is_causal=is_causal, scale=scale,
                                   attn_mask=attn_mask, dropout_p=dropout_p, group=group,
                                   layout=layout, window=window, softcap=softcap,
                                   cu_seqlens=cu_seqlens)


def ring_attention_of_heads(query: Tensor, key: Tensor, value: Tensor, *,
                            is_causal: bool = False, scale: Optional[float] = None,
                            attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                            group: Optional[dist.ProcessGroup] = None,
                            layout: str = "zigzag",
                            window: Optional[tuple[int, int]] = None,
                            softcap: Optional[float] = None,
                            cu_seqlens: Optional[Tensor] = None,
                            dropout_seed: Optional[Tensor] = None,
                            head_offset: int = 0, return_lse: bool = False):
    """ring_attention over a slice of the heads (the hybrid's ring, after Ulysses): the
    dropout seed already agreed (not drawn again) and the global index of query head 0 in
    the dropout RNG key, so the slice drops what one device drops on those heads. With
    return_lse, (out, lse): lse [B, Hq, S_local] float64, no gradient (the hybrid's
    backward checks it for saturated rows on every rank of the mesh)."""
    try:  # what the op's schema can carry; anything else raises on every rank
        for arg, t in (("query", query), ("key", key), ("value", value)):
            check_tensor(arg, t)
        check_mask_type(attn_mask)
        if layout != "auto":  # resolved in the op, by the agreement
            check_layout(layout)
        if cu_seqlens is not None:
            check_tensor("cu_seqlens", cu_seqlens)
        args = (check_bool("is_causal", is_causal), check_scale(scale),
                check_dropout_p(dropout_p), check_window(window), check_softcap(softcap))
    except (RingAttnException, TypeError, ValueError, IndexError):
        agree_on_inputs(query, key, value, attn_mask, is_causal=is_causal, scale=scale,
                        dropout_p=dropout_p, layout=layout, info=group_info(group),
                        window=window, softcap=softcap, cu_seqlens=cu_seqlens,
                        seed=dropout_seed)
        raise
    is_causal, scale, dropout_p, window, softcap = args
    if not (dist.is_available() and dist.is_initialized()):
        group_info(group)  # raises, saying how to initialise
    name = (group if group is not None else dist.group.WORLD).group_name
    out, lse, _ = ring_fwd(query, key, value, attn_mask, cu_seqlens, dropout_seed, is_causal,
                           scale, dropout_p, layout,
                           list(window) if window is not None else None, softcap,
                           head_offset, name)
    return (out, lse) if return_lse else out
