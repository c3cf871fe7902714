"""The sharded KV cache: each rank keeps an equal share of every layer's cached K/V.

Placement (pure, the same on every rank, so no rank ever asks another where a token is):

  - a chunk of N new tokens gives every rank N // P tokens and the N % P left over to
    the ranks holding the fewest tokens so far (ties: the lowest rank). Ranks therefore
    never differ by more than one token: after any sequence of calls each holds
    floor(T / P) or ceil(T / P) of the T cached tokens. A decode token is a chunk of one,
    so decode tokens go round-robin.
  - inside a prefill chunk a rank's n tokens are a head piece (ceil(n / 2) tokens) and a
    tail piece (floor(n / 2)), zigzag style: heads in rank order from the chunk's start,
    tails in reverse rank order up to its end, so every rank does the same causal work
    within the chunk (the cached prefix is fully visible to every new query anyway).

Per layer the cache holds this rank's K [B, Hk, n, D] and V [B, Hk, n, Dv] (KV heads only:
GQA is never expanded), the global position of each row (int64 [n], the same for the B
sequences: every sequence of a batch has the same cached length), and a mirror of every
rank's row count (what the placement rule and the ring's message sizes need). Rows are
appended in call order; the buffers grow geometrically (x2), so T appended tokens cost
O(log T) reallocations, not one per decode step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..comm import GroupInfo, group_info
from ..errors import RingAttnError, RingAttnTypeError

Tensor = torch.Tensor

_MIN_CAPACITY = 16  # rows: the first allocation of a layer that grows from empty


def placement(counts: Sequence[int], n_new: int) -> list[int]:
    """How many of n_new new tokens each rank takes, given each rank's current count:
    n_new // P each, the n_new % P left over to the ranks with the fewest tokens (ties:
    lowest rank). Keeps max(counts) - min(counts) <= 1 when it held before."""
    p = len(counts)
    take = [n_new // p] * p
    for r in sorted(range(p), key=lambda r: (counts[r], r))[: n_new % p]:
        take[r] += 1
    return take


def chunk_runs(takes: Sequence[int]) -> list[list[tuple[int, int]]]:
    """Per rank, its (start, length) runs within a chunk of sum(takes) tokens: a head
    piece of ceil(n / 2) tokens (heads in rank order from the chunk's start) and a tail
    piece of floor(n / 2) (tails in reverse rank order up to the chunk's end)."""
    heads = [n - n // 2 for n in takes]
    tails = [n // 2 for n in takes]
    n_heads = sum(heads)
    runs = []
    for r in range(len(takes)):
        mine = [(sum(heads[:r]), heads[r]), (n_heads + sum(tails[r + 1:]), tails[r])]
        runs.append([(s, n) for s, n in mine if n > 0])
    return runs


def chunk_positions(takes: Sequence[int], rank: int, start: int,
                    device: Optional[torch.device] = None) -> Tensor:
    """Global positions (int64) of rank's tokens in a chunk that starts at `start`."""
    parts = [torch.arange(start + s, start + s + n, dtype=torch.int64, device=device)
             for s, n in chunk_runs(takes)[rank]]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=device)


def decode_owners(counts: Sequence[int], n_new: int) -> list[int]:
    """The rank that takes each of n_new decode tokens, one token at a time (each a chunk
    of one: round-robin once the ranks are balanced)."""
    counts, owners = list(counts), []
    for _ in range(n_new):
        r = placement(counts, 1).index(1)
        counts[r] += 1
        owners.append(r)
    return owners


@dataclass
class _Layer:
    k: Optional[Tensor] = None      # [B, Hk, capacity, D]
    v: Optional[Tensor] = None      # [B, Hk, capacity, Dv]
    pos: Optional[Tensor] = None    # int64 [capacity]
    counts: list = field(default_factory=list)  # rows held by each rank (mirror)
    reallocations: int = 0


def _info(group: Optional[dist.ProcessGroup]) -> GroupInfo:
    """The group's rank and size; one rank (no communication) when torch.distributed is
    not initialised and no group is given."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return GroupInfo(None, 0, 1, "none")
    return group_info(group)


class ShardedKVCache:
    """This rank's share of a decoder's K/V cache over the ranks of `group`.

    Args:
      num_layers: attention layers (each has its own K/V).
      batch, kv_heads, head_dim: B, Hk (key/value heads: GQA/MQA caches Hk heads, never
        the query heads), D. value_head_dim: Dv (default D).
      dtype, device: of the cached K/V (the inputs of ring_prefill / ring_decode must match).
      group: the ranks sharing the cache (default: the world; one rank when
        torch.distributed is not initialised).
      capacity: rows to allocate per layer up front (default: grow from 16, x2 when full).

    Fill it with ring_attn.ring_prefill / ring_decode, which append the new K/V on the
    placement above. A batch holds B sequences of the same cached length.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int,
                 value_head_dim: Optional[int] = None, *, dtype: torch.dtype = torch.float32,
                 device: "torch.device | str" = "cpu",
                 group: Optional[dist.ProcessGroup] = None, capacity: int = 0) -> None:
        for name, x, lo in (("num_layers", num_layers, 1), ("batch", batch, 1),
                            ("kv_heads", kv_heads, 1), ("head_dim", head_dim, 1),
                            ("capacity", capacity, 0)):
            if not isinstance(x, int) or isinstance(x, bool):
                raise RingAttnTypeError(f"ring_attn: ShardedKVCache {name} must be an int, "
                                        f"got {type(x).__name__} {x!r}")
            if x < lo:
                raise RingAttnError(f"ring_attn: ShardedKVCache {name} must be >= {lo}, "
                                    f"got {x}")
        self.info = _info(group)
        self.batch, self.kv_heads, self.head_dim = batch, kv_heads, head_dim
        self.value_head_dim = head_dim if value_head_dim is None else value_head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self._layers = [_Layer(counts=[0] * self.info.world_size) for _ in range(num_layers)]
        if capacity:
            for layer in self._layers:
                self._grow(layer, capacity)

    # ---- what the cache holds ---------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def layer_state(self, layer: int) -> _Layer:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise RingAttnTypeError(f"ring_attn: layer must be an int, got "
                                    f"{type(layer).__name__} {layer!r}")
        if not 0 <= layer < len(self._layers):
            raise RingAttnError(f"ring_attn: layer must be in [0, {len(self._layers)}) for "
                                f"this cache, got {layer}")
        return self._layers[layer]

    def length(self, layer: int = 0) -> int:
        """Tokens cached for this layer over all ranks (per sequence)."""
        return sum(self.layer_state(layer).counts)

    def local_length(self, layer: int = 0) -> int:
        """Tokens this rank holds for this layer."""
        return self.layer_state(layer).counts[self.rank]

    def counts(self, layer: int = 0) -> list[int]:
        """Tokens each rank holds for this layer."""
        return list(self.layer_state(layer).counts)

    def keys(self, layer: int = 0) -> Tensor:
        """This rank's cached keys [B, Hk, local_length, D] (a view)."""
        st = self.layer_state(layer)
        n = st.counts[self.rank]
        return self._empty(self.head_dim) if st.k is None else st.k[:, :, :n]

    def values(self, layer: int = 0) -> Tensor:
        """This rank's cached values [B, Hk, local_length, Dv] (a view)."""
        st = self.layer_state(layer)
        n = st.counts[self.rank]
        return self._empty(self.value_head_dim) if st.v is None else st.v[:, :, :n]

    def positions(self, layer: int = 0) -> Tensor:
        """Global positions (int64) of this rank's cached rows."""
        st = self.layer_state(layer)
        n = st.counts[self.rank]
        return torch.empty(0, dtype=torch.int64, device=self.device) if st.pos is None \
            else st.pos[:n]

    def memory_bytes(self, layer: Optional[int] = None) -> int:
        """Bytes of K/V this rank holds (rows in use, all layers or one): the cache's
        total / P, within one token per layer."""
        layers = range(self.num_layers) if layer is None else [layer]
        per_row = self.batch * self.kv_heads * (self.head_dim + self.value_head_dim) * \
            torch.empty((), dtype=self.dtype).element_size()
        return sum(self.local_length(i) * per_row for i in layers)

    def allocated_bytes(self) -> int:
        """Bytes this rank has allocated for K/V and positions (capacity, all layers)."""
        return sum(t.numel() * t.element_size() for st in self._layers
                   for t in (st.k, st.v, st.pos) if t is not None)

    def reallocations(self, layer: int = 0) -> int:
        """How often this layer's buffers were reallocated (O(log T) by the x2 growth)."""
        return self.layer_state(layer).reallocations

    # ---- where new tokens go ----------------------------------------------------------
    def prefill_positions(self, n_new: int, layer: int = 0) -> Tensor:
        """Global positions (int64, ascending) of this rank's share of the next prefill
        chunk of n_new tokens: ring_prefill's q, k, v hold exactly these tokens, in this
        order (shard_chunk cuts them out of the whole chunk)."""
        st = self.layer_state(layer)
        return chunk_positions(placement(st.counts, n_new), self.rank, sum(st.counts),
                               self.device)

    def shard_chunk(self, x: Tensor, dim: int = 2, layer: int = 0) -> Tensor:
        """This rank's share of a whole chunk x (new tokens along dim), in the order of
        prefill_positions."""
        runs = chunk_runs(placement(self.layer_state(layer).counts, x.size(dim)))[self.rank]
        parts = [x.narrow(dim, s, n) for s, n in runs]
        return torch.cat(parts, dim) if parts else x.narrow(dim, 0, 0)

    # ---- appending (ring_prefill / ring_decode, after the ranks agreed) ----------------
    def append(self, layer: int, k: Tensor, v: Tensor, pos: Tensor,
               takes: Sequence[int]) -> None:
        """Append this rank's new rows (k, v, their global positions) and advance every
        rank's count by `takes` (the placement all ranks computed)."""
        st = self.layer_state(layer)
        n_old, n = st.counts[self.rank], k.size(2)
        if n != takes[self.rank]:
            raise AssertionError("ring_attn: appended rows differ from the placement")
        if st.k is None or n_old + n > st.k.size(2):
            self._grow(st, max(n_old + n, 2 * (0 if st.k is None else st.k.size(2)),
                               _MIN_CAPACITY))
        st.k[:, :, n_old:n_old + n].copy_(k)
        st.v[:, :, n_old:n_old + n].copy_(v)
        st.pos[n_old:n_old + n].copy_(pos)
        st.counts = [c + t for c, t in zip(st.counts, takes)]

    def _empty(self, d: int) -> Tensor:
        return torch.empty(self.batch, self.kv_heads, 0, d, dtype=self.dtype,
                           device=self.device)

    @torch.inference_mode(False)
    def _grow(self, st: _Layer, capacity: int) -> None:
        # Normal tensors even when growing inside torch.inference_mode(): an inference
        # tensor could not be appended to outside it later (torch refuses the in-place copy).
        n = st.counts[self.rank]
        shape = (self.batch, self.kv_heads, capacity)
        k = torch.empty(*shape, self.head_dim, dtype=self.dtype, device=self.device)
        v = torch.empty(*shape, self.value_head_dim, dtype=self.dtype, device=self.device)
        pos = torch.empty(capacity, dtype=torch.int64, device=self.device)
        if st.k is not None:
            k[:, :, :n].copy_(st.k[:, :, :n])
            v[:, :, :n].copy_(st.v[:, :, :n])
            pos[:n].copy_(st.pos[:n])
            st.reallocations += 1
        st.k, st.v, st.pos = k, v, pos
