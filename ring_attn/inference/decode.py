"""ring_decode: one (or a few) new tokens per sequence, replicated on every rank.

The new tokens' K/V are appended round-robin (cache.decode_owners); then every rank
attends the (replicated) queries to the rows it holds, with partial.shard_partial (causal
on global positions among the new tokens), and one all_gather of the small partials
(out float32 + lse float64, B * Hq * n * (Dv + 2) floats per rank) lets every rank merge
them exactly, in rank order: every rank returns the same bits.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..comm import all_gather
from .cache import ShardedKVCache
from .checks import agree
from .partial import merge_partials, pack_partial, shard_partial, unpack_partial

Tensor = torch.Tensor

PARTIAL_TAG = 7321  # the tag record_traffic files the all_gather under


def ring_decode(q: Tensor, k: Tensor, v: Tensor, cache: ShardedKVCache, *, layer: int = 0,
                scale: Optional[float] = None, group: Optional[dist.ProcessGroup] = None,
                cache_seqlens: Optional[Tensor] = None) -> Tensor:
    """Attention of n new tokens (the same on every rank) over the cache and, causally,
    each other; their K/V are appended to the cache (token j at global position T + j, T
    the cached length, on the rank cache.decode_owners gives).

    Args:
      q: [B, Hq, n, D], k: [B, Hk, n, D], v: [B, Hk, n, Dv]: the new tokens, replicated
        (every rank passes the same values; only the owners' rows are kept).
      cache, layer, scale, group, cache_seqlens: as ring_prefill.

    Returns [B, Hq, n, Dv] in q's dtype, identical on every rank. Inference only (raises
    if an input requires grad while grad mode is on); the ranks agree before sending.
    """
    call = agree(1, q, k, v, cache, layer, scale, "auto", group, cache_seqlens)
    info = cache.info
    with torch.no_grad():
        start = sum(call.counts)
        mine = [j for j, owner in enumerate(call.owners) if owner == info.rank]
        idx = torch.tensor(mine, dtype=torch.int64, device=q.device)
        pos = idx + start
        cache.append(layer, k.index_select(2, idx), v.index_select(2, idx), pos, call.new)
        q_pos = torch.arange(start, start + q.size(2), dtype=torch.int64, device=q.device)
        part = shard_partial(q, q_pos, cache.keys(layer), cache.values(layer),
                             call.counts[info.rank], pos, call.scale)
        if info.world_size > 1:
            b, h, n, dv = part[0].shape
            bufs = all_gather(pack_partial(part), info, PARTIAL_TAG)
            part = merge_partials([unpack_partial(buf, b, h, n, dv) for buf in bufs])
        return part[0].to(q.dtype)
