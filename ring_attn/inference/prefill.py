"""ring_prefill: a chunk of new tokens, sharded over the ranks, attends to the whole
cached prefix and causally to itself; its K/V are appended to the sharded cache.

Both strategies compute the same blocks with the same function (partial.shard_partial:
queries of rank s against the rows held by rank r, causal on global positions); they
differ in what travels:

  pass-KV  (like the training ring) every rank's rows [cache | new] visit every rank:
           for t in 0..P-1: post send(held rows -> r+1), recv(rows of r-t-1 <- r-1);
                            merge partial(own queries, held rows); wait
  pass-Q   the cache stays put; the queries visit every rank and each visited rank sends
           the partial (out, lse) home, where the owner merges them in hop order:
           post recv(partials of own queries <- r+1 .. r+P-1)
           for t in 0..P-1: post send(held queries -> r+1), recv(queries of r-t-1);
                            partial(held queries, own rows); t > 0: send it home; wait
           merge own partial, then the partials of hops 1..P-1

Messages are counted by comm.record_traffic; strategy.py has their sizes in closed form.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..comm import RingComm, pack, unpack
from ..merge import acc_dtype, merge_
from .cache import ShardedKVCache, chunk_positions
from .checks import agree
from .partial import (Partial, merge_partials, pack_partial, partial_numel, shard_partial,
                      unpack_partial)

Tensor = torch.Tensor

# gloo matches messages by (peer, tag): the prefill's streams get their own tags.
KV_TAG = 7311
Q_TAG = 7312
PARTIAL_TAG = 7313


def _rows_shape(shape: torch.Size, rows: int) -> torch.Size:
    return torch.Size((shape[0], shape[1], rows, shape[3]))


def _pass_kv(comm: Optional[RingComm], q: Tensor, positions: list, k: Tensor, v: Tensor,
             counts: list, new: list, scale: float) -> Partial:
    r = comm.info.rank if comm is not None else 0
    p = len(counts)
    held, src = (k, v), r
    acc: Optional[Partial] = None
    buf = pack([k, v]) if p > 1 else None
    for t in range(p):
        pending, nxt = None, None
        if t < p - 1:  # the next step's rows, while this step computes
            s = (r - t - 1) % p
            rows = counts[s] + new[s]
            per_row = k.size(0) * k.size(1) * (k.size(3) + v.size(3))
            nxt = (k.new_empty(rows * per_row), rows)
            pending = comm.exchange([((r + 1) % p, buf)], [((r - 1) % p, nxt[0])], KV_TAG)
        part = shard_partial(q, positions[r], held[0], held[1], counts[src], positions[src],
                             scale)
        if acc is None:
            acc = part
        else:
            merge_(acc[0], acc[1], *part)
        if pending is not None:
            pending.wait()
            buf, rows = nxt
            held = tuple(unpack(buf, [_rows_shape(k.shape, rows), _rows_shape(v.shape, rows)]))
            src = (src - 1) % p
    return acc


def _pass_q(comm: Optional[RingComm], q: Tensor, positions: list, k: Tensor, v: Tensor,
            counts: list, new: list, scale: float) -> Partial:
    r = comm.info.rank if comm is not None else 0
    p = len(counts)
    b, h, n, dv = q.size(0), q.size(1), q.size(2), v.size(3)
    if p == 1:
        return shard_partial(q, positions[r], k, v, counts[r], positions[r], scale)
    # At hop t rank r + t holds this rank's queries: its partial comes home from there.
    homes = [q.new_empty(partial_numel(b, h, n, dv, q.dtype), dtype=acc_dtype(q.dtype))
             for _ in range(p - 1)]
    arriving = comm.exchange([], [((r + t) % p, homes[t - 1]) for t in range(1, p)],
                             PARTIAL_TAG)
    held, src, sending = q.contiguous(), r, []
    for t in range(p):
        pending, nxt = None, None
        if t < p - 1:
            s = (r - t - 1) % p
            nxt = q.new_empty((b, h, new[s], q.size(3)))
            pending = comm.exchange([((r + 1) % p, held)], [((r - 1) % p, nxt)], Q_TAG)
        part = shard_partial(held, positions[src], k, v, counts[r], positions[r], scale)
        if t == 0:
            own = part
        else:
            buf = pack_partial(part)
            sending.append(comm.exchange([(src, buf)], [], PARTIAL_TAG))
            sending[-1].keep = [buf]
        if pending is not None:
            pending.wait()
            held, src = nxt, (src - 1) % p
    arriving.wait()
    for s in sending:
        s.wait()
    return merge_partials([own] + [unpack_partial(buf, b, h, n, dv) for buf in homes])


def ring_prefill(q: Tensor, k: Tensor, v: Tensor, cache: ShardedKVCache, *, layer: int = 0,
                 strategy: str = "auto", scale: Optional[float] = None,
                 group: Optional[dist.ProcessGroup] = None,
                 cache_seqlens: Optional[Tensor] = None) -> Tensor:
    """Causal attention of this rank's share of a chunk of new tokens over every cached
    token and every new token at or before it (global positions), then appends the new
    K/V to the cache.

    Args:
      q: [B, Hq, n_r, D], k: [B, Hk, n_r, D], v: [B, Hk, n_r, Dv]: this rank's n_r new
        tokens at the positions cache.prefill_positions(N, layer) (ascending), where N is
        the chunk's size summed over ranks; cache.shard_chunk(x) cuts them from a whole
        chunk. Hk: the cache's KV heads (Hq % Hk == 0: GQA/MQA, never expanded).
      cache: the ShardedKVCache of the group; layer: which of its layers.
      strategy: "pass_kv" (K/V travel), "pass_q" (queries travel, partial outputs come
        home) or "auto" (strategy.choose_strategy: the one that sends fewer bytes,
        counting pass-Q's exposed last round as 1.5 MiB).
      scale: score scale, default 1/sqrt(D). group: None or the cache's group.
      cache_seqlens: optional, flash-attn's per-sequence cached lengths [B]: every
        sequence of a cache has the cache's length, so any other value (a serving batch
        of sequences with different cached lengths) raises, saying so.

    Returns this rank's output [B, Hq, n_r, Dv] in q's dtype (float32 accumulation and
    merge; float64 for float64). Inference only: raises if an input requires grad while
    grad mode is on. Ranks agree on every argument, on the cache's contents and on the
    chunk's placement before anything is sent, and raise together otherwise.
    """
    call = agree(0, q, k, v, cache, layer, scale, strategy, group, cache_seqlens)
    info = cache.info
    with torch.no_grad():
        start = sum(call.counts)
        positions = [chunk_positions(call.new, s, start, q.device)
                     for s in range(info.world_size)]
        cache.append(layer, k, v, positions[info.rank], call.new)
        comm = RingComm(info) if info.world_size > 1 else None
        run = _pass_kv if call.strategy == "pass_kv" else _pass_q
        out, _ = run(comm, q, positions, cache.keys(layer), cache.values(layer), call.counts,
                     call.new, call.scale)
        return out.to(q.dtype)
