"""Checks of ring_prefill / ring_decode inputs, and the ranks' agreement before any
transfer: each rank checks its own inputs, then one all_gather of a small int64 vector
(validate.agree_on_fields, the ring's mechanism and vector length) makes every rank raise
together, naming the argument and the rank, when one rank's inputs are bad or the ranks
disagree on the call, layer, shapes, dtype, scale, strategy or the cache's contents: a
mismatch never hangs. The same vector carries each rank's new-token count and cached
count, from which every rank derives the chunk's size and checks the placement.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ..errors import RingAttnError, RingAttnTypeError
from ..functional import _has_kernel, check_scale, check_tensor
from ..validate import (_DEVICES, _DTYPES, RingInputError, _fingerprint, agree_on_fields,
                        bits_float, float_bits)
from .cache import ShardedKVCache, decode_owners, placement
from .strategy import STRATEGIES, check_strategy, choose_strategy

Tensor = torch.Tensor

_MAGIC = 0x52494E49  # "RINI": an inference call's agreement vector
_KINDS = ("ring_prefill", "ring_decode")
_FIELDS = ["call (0 ring_prefill, 1 ring_decode)", "layer", "batch", "query heads",
           "key/value heads", "head dim", "value head dim", "dtype", "device type", "scale",
           "strategy", "new tokens (ring_decode: the same on every rank)",
           "cached tokens (the cache's length for this layer)",
           "tokens cached per rank (64-bit hash of the counts)"]


def _show(name: str, value: int) -> str:
    if value == -1:
        return "n/a"
    if name == "dtype":
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "?"
    if name == "device type":
        return _DEVICES[value] if 0 <= value < len(_DEVICES) else "?"
    if name == "scale":
        return repr(bits_float(value))
    if name == "strategy":
        return repr(STRATEGIES[value]) if 0 <= value < len(STRATEGIES) else "?"
    if name.startswith("call"):
        return _KINDS[value] if 0 <= value < len(_KINDS) else "?"
    if name.startswith("tokens cached per rank"):
        return f"{value & (2**64 - 1):#018x}"
    return str(value)


@dataclass(frozen=True)
class Call:
    """What every rank agreed on for one call."""
    scale: float
    counts: list           # tokens each rank held before the call
    new: list              # new tokens each rank takes (prefill: its shard; decode: owned)
    n_new: int             # the chunk's (prefill) or the step's (decode) new tokens
    strategy: str          # prefill: "pass_kv" or "pass_q" ("auto" resolved)
    owners: Optional[list] = None  # decode: the rank that takes each new token


def check_cache_seqlens(name: str, cache_seqlens: object, cache: ShardedKVCache,
                        layer: int) -> None:
    """A serving batch whose sequences have different cached lengths is refused: every
    sequence of a ShardedKVCache has the cache's length (flash-attn's cache_seqlens, when
    given, must say so)."""
    if cache_seqlens is None:
        return
    if isinstance(cache_seqlens, Tensor):
        cache_seqlens = cache_seqlens.tolist()
    if not isinstance(cache_seqlens, (list, tuple)) or \
            not all(isinstance(x, int) for x in cache_seqlens):
        raise RingAttnTypeError(f"ring_attn: {name} cache_seqlens must be None, a 1-D int tensor "
                                f"or a list of ints, got {type(cache_seqlens).__name__}")
    t = cache.length(layer)
    if len(cache_seqlens) != cache.batch or any(x != t for x in cache_seqlens):
        raise RingAttnError(
            f"ring_attn: {name}: sequences with different cached lengths in one batch are not "
            f"supported: cache_seqlens = {list(cache_seqlens)}, but a ShardedKVCache holds the "
            f"same {t} tokens for each of its {cache.batch} sequences; put sequences of equal "
            "length in one cache (one cache per length)")


def _local_check(kind: int, q: Tensor, k: Tensor, v: Tensor, cache: ShardedKVCache,
                 layer: int, scale: object, strategy: object,
                 group: Optional[dist.ProcessGroup], cache_seqlens: object = None) -> float:
    name = _KINDS[kind]
    if group is not None and group is not cache.info.group:
        raise RingAttnError(f"ring_attn: {name} group must be the cache's group (or None), "
                            f"got another process group")
    cache.layer_state(layer)
    check_cache_seqlens(name, cache_seqlens, cache, layer)
    check_strategy(strategy)
    scale = check_scale(scale)
    for arg, t in (("query", q), ("key", k), ("value", v)):
        check_tensor(arg, t)
        if t.dim() != 4:
            raise RingAttnError(f"ring_attn: {name} {arg} must be 4-D [B, H, N, D], got "
                                f"{t.dim()}-D of shape {tuple(t.shape)}")
        if t.dtype != cache.dtype:
            raise RingAttnError(f"ring_attn: {name} {arg} dtype must be the cache's "
                                f"{cache.dtype}, got {t.dtype}")
        if t.device != cache.device:
            raise RingAttnError(f"ring_attn: {name} {arg} must be on the cache's device "
                                f"{cache.device}, got {t.device}")
        if t.requires_grad and torch.is_grad_enabled():
            raise RingAttnError(f"ring_attn: {name} is inference only (gradients do not flow "
                                f"through the cache), but {arg} requires grad: call it under "
                                "torch.no_grad() or torch.inference_mode()")
    if not _has_kernel(q.device):
        raise RingAttnError(f"ring_attn: no ring_attn kernel for device {q.device}")
    want = {"query": (cache.batch, None, None, cache.head_dim),
            "key": (cache.batch, cache.kv_heads, q.size(2), cache.head_dim),
            "value": (cache.batch, cache.kv_heads, q.size(2), cache.value_head_dim)}
    dims = ("batch", "heads", "new tokens", "head dim")
    for arg, t in (("query", q), ("key", k), ("value", v)):
        for i, w in enumerate(want[arg]):
            if w is not None and t.size(i) != w:
                raise RingAttnError(f"ring_attn: {name} {arg} dim {i} ({dims[i]}) must be "
                                    f"{w} (the cache's / the query's), got {t.size(i)} "
                                    f"(shape {tuple(t.shape)})")
    if q.size(1) % cache.kv_heads != 0:
        raise RingAttnError(f"ring_attn: {name} query heads ({q.size(1)}) must be a multiple "
                            f"of the cache's key/value heads ({cache.kv_heads})")
    return 1.0 / math.sqrt(q.size(3)) if scale is None else scale


def agree(kind: int, q: Tensor, k: Tensor, v: Tensor, cache: ShardedKVCache, layer: int,
          scale: object, strategy: str, group: Optional[dist.ProcessGroup],
          cache_seqlens: object = None) -> Call:
    """Check this rank's inputs and agree with every rank of the cache's group; raise on
    every rank otherwise. kind: 0 ring_prefill, 1 ring_decode."""
    if not isinstance(cache, ShardedKVCache):  # no group to agree with: raise here
        raise RingAttnTypeError(f"ring_attn: {_KINDS[kind]} cache must be a "
                                f"ring_attn.ShardedKVCache, got {type(cache).__name__}")
    info = cache.info
    error: Optional[BaseException] = None
    try:
        scale = _local_check(kind, q, k, v, cache, layer, scale, strategy, group,
                             cache_seqlens)
        counts = cache.counts(layer)
        fields = [kind, layer, q.size(0), q.size(1), k.size(1), q.size(3), v.size(3),
                  _DTYPES.index(q.dtype), _DEVICES.index(q.device.type), float_bits(scale),
                  STRATEGIES.index(strategy), q.size(2) if kind == 1 else -1, sum(counts),
                  _fingerprint(tuple(counts))[1]]
        mine = [q.size(2), counts[info.rank]]
    except (RingAttnError, TypeError, ValueError) as e:
        if info.world_size == 1:
            raise
        error, fields, mine = e, [-1] * len(_FIELDS), [-1, -1]
    rows = agree_on_fields(_MAGIC, _KINDS[kind], fields, _FIELDS, error, info, mine,
                           show=_show)
    held = [row[2 + len(_FIELDS) + 1] for row in rows]
    if held != counts:  # the hashes agreed: the same on every rank, so all raise here
        raise RingInputError(f"ring_attn: {_KINDS[kind]}: the ranks hold {held} cached tokens "
                             f"but the cache's record is {counts}: the cache was changed "
                             "outside ring_prefill / ring_decode")
    shards = [row[2 + len(_FIELDS)] for row in rows]
    if kind == 1:
        n = q.size(2)
        owners = decode_owners(counts, n)
        new = [owners.count(r) for r in range(info.world_size)]
        return Call(scale, counts, new, n, "pass_kv", owners)
    n = sum(shards)
    want = placement(counts, n)
    if shards != want:
        raise RingInputError(
            f"ring_attn: ring_prefill: the ranks' new-token shards have {shards} tokens, but a "
            f"chunk of {n} new tokens over a cache holding {counts} puts {want} on ranks "
            f"0..{info.world_size - 1} (cache.prefill_positions(n) / cache.shard_chunk(x) "
            "give each rank its tokens)")
    if strategy == "auto":
        strategy = choose_strategy(n, sum(counts), q.size(1), k.size(1), q.size(3), v.size(3),
                                   q.dtype, info.world_size, q.size(0))
    return Call(scale, counts, shards, n, strategy)
