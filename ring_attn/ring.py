"""Pass-KV ring attention over torch.distributed, forward and backward.

Forward, on every rank r of P, with its query shard Q_r and K/V shard (K_r, V_r):

    kv = pack(K_r, V_r)                      # one contiguous buffer, KV heads only (GQA
    for t in 0 .. P-1:                       # is never expanded on the wire)
        if t < P-1: post send kv -> r+1, recv next <- r-1     (non-blocking)
        partial = kernel(Q_r, block of kv per the schedule)   (overlaps the transfer)
        merge partial into (out, lse) in the accumulation dtype (float32; float64 for float64)
        if t < P-1: wait; kv, next = next, kv                  (double buffer)
    return out cast to the input dtype, once

Backward (one autograd.Function; the global out and lse saved by forward make every
block's probabilities final, so blocks are independent):

    dq = 0 (accumulation dtype, stays home); K/V travel the ring again, prefetched as in
    forward; the dK/dV accumulator of the K/V shard held at step t travels with it, one
    step behind: it is received from r-1 while step t computes its partial, the partial
    is added, and it is sent on to r+1. After P steps each accumulator has visited every
    rank and one last hop brings it home to its owner.

The schedule (which rows of which block, whether the block needs the causal mask or is
skipped) is the pure function in schedule.py; the per-step kernel call and merge are in
block.py, shared with the simulated ring (simulated.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.distributed as dist

from .block import RingSpec, backward_block, forward_block
from .comm import DKV_TAG, KV_TAG, RingComm, group_info, pack, unpack
from .errors import refuse_double_backward
from .merge import acc_dtype
from .validate import agree_on_backward, agree_on_inputs, rows_nonfinite

Tensor = torch.Tensor


def ring_forward(spec: RingSpec, comm: Optional[RingComm], q: Tensor, k: Tensor, v: Tensor,
                 mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """This rank's attention over the whole ring: (out, lse) in the accumulation dtype."""
    shapes = [k.shape, v.shape]
    kv = pack([k, v]) if spec.world_size > 1 else None
    spare = torch.empty_like(kv) if kv is not None else None
    acc = None
    for blk in spec.plan:
        pending = None
        if blk.step + 1 < spec.world_size:
            pending = comm.exchange(kv, spare, KV_TAG)
        kb, vb = (k, v) if kv is None else unpack(kv, shapes)
        acc = forward_block(spec, blk, q, kb, vb, mask, acc)
        if pending is not None:
            pending.wait()
            kv, spare = spare, kv
    return acc


def ring_backward(spec: RingSpec, comm: Optional[RingComm], dout: Tensor, q: Tensor,
                  k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's shards (dq, dk, dv) of the gradients, in the inputs' dtypes."""
    p = spec.world_size
    # Every rank must be in the backward of the same call (and none may ask for a double
    # backward) before any K/V moves: raises on every rank otherwise (validate.py).
    if comm is None:
        refuse_double_backward()
    else:
        rows_flag = rows_nonfinite(q, None, dout, out)
        if agree_on_backward(comm.info, spec.call, dout, torch.is_grad_enabled(),
                             rows_flag) and not spec.rows_nonfinite:
            # A non-finite dout or out reaches every key's gradient (0 * NaN): compute
            # the blocks the forward skipped.
            spec = dataclasses.replace(spec, rows_nonfinite=True)
    dt = acc_dtype(q.dtype)
    shapes = [k.shape, v.shape]
    dq = torch.zeros(q.shape, dtype=dt, device=q.device)
    # Two dK/dV buffers alternate: one is sent on while the other receives. Step 0's
    # starts at zero; every later one is overwritten by a receive.
    n = k.numel() + v.numel()
    dkv = [torch.zeros(n, dtype=dt, device=k.device)]
    dkv.append(torch.empty(n, dtype=dt, device=k.device) if p > 1 else dkv[0])
    kv = pack([k, v]) if p > 1 else None
    spare = torch.empty_like(kv) if kv is not None else None
    pending_dkv = None
    for blk in spec.plan:
        pending_kv = None
        if blk.step + 1 < p:
            pending_kv = comm.exchange(kv, spare, KV_TAG)
        kb, vb = (k, v) if kv is None else unpack(kv, shapes)
        grads = backward_block(spec, blk, dout, q, kb, vb, out, lse, mask)
        # The accumulator of the K/V shard held now arrived from r-1 while we computed.
        if pending_dkv is not None:
            pending_dkv.wait()
        acc = dkv[blk.step % 2]
        if grads is not None:
            grads.add_to(dq, *unpack(acc, shapes))
        if p > 1:
            # acc goes on to r+1; the other buffer (its send completed in the wait above)
            # receives the next accumulator from r-1. After the last step that is the
            # accumulator of our own K/V shard, home after visiting every rank.
            pending_dkv = comm.exchange(acc, dkv[(blk.step + 1) % 2], DKV_TAG)
        if pending_kv is not None:
            pending_kv.wait()
            kv, spare = spare, kv
    if pending_dkv is not None:
        pending_dkv.wait()
    dk, dv = unpack(dkv[p % 2], shapes)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                spec: RingSpec, comm: Optional[RingComm]) -> Tensor:
        acc_out, lse = ring_forward(spec, comm, q, k, v, mask)
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, mask)  # lse in the accumulation dtype
        ctx.spec, ctx.comm = spec, comm
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = ring_backward(ctx.spec, ctx.comm, dout, q, k, v, out, lse, mask)
        return dq, dk, dv, None, None, None


def ring_attention(query: Tensor, key: Tensor, value: Tensor, *, is_causal: bool = False,
                   scale: Optional[float] = None, attn_mask: Optional[Tensor] = None,
                   dropout_p: float = 0.0, group: Optional[dist.ProcessGroup] = None,
                   layout: str = "zigzag") -> Tensor:
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
      layout: "zigzag" (default), "contiguous" or "striped" (see ring_attn.layout).

    Returns this rank's shard [B, Hq, S_local, Dv] of the exact attention output. Its
    backward gives this rank's shards of the exact gradients of sum over ranks of each
    rank's loss (the loss of the whole sequence when each rank's loss covers its shard).

    Before any transfer, one all_gather checks that every rank agrees on shapes, dtype,
    device type, layout, causal, scale, dropout, mask presence and the call's number in
    the group; a disagreement raises on every rank, naming the rank that differs. The
    backward starts with one more small all_gather: ranks in the backwards of different
    calls (a different backward order), or asking for a double backward
    (create_graph=True, not supported), raise on every rank before any K/V moves.
    NaN/inf propagate as in torch's math backend on the full sequence (blocks of a
    non-finite K/V shard, or of non-finite query rows, are computed, not skipped).
    """
    info = group_info(group)
    agreed = agree_on_inputs(query, key, value, attn_mask, is_causal=is_causal,
                             scale=scale, dropout_p=dropout_p, layout=layout, info=info)
    spec = RingSpec(info.rank, info.world_size, layout, is_causal, agreed.scale,
                    agreed.dropout_p, agreed.seed, query.size(2), agreed.kv_nonfinite,
                    agreed.rows_nonfinite, agreed.call)
    comm = RingComm(info) if info.world_size > 1 else None
    return _RingAttention.apply(query, key, value, agreed.mask, spec, comm)
