"""Cross-rank agreement, checked before the ring sends anything.

A ring whose ranks disagree (one rank causal, another not; a shard of another length; a
different dtype) would deadlock on mismatched message sizes or silently compute garbage.
So every rank first checks its own inputs, then all ranks all_gather one small int64
vector describing them (fixed length, so the collective itself cannot mismatch), and
every rank compares all of them. A rank whose own check failed reports it through the
same vector, so all ranks raise together, each naming the rank at fault: never a hang.
The same collective carries rank 0's dropout seed to everyone.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .comm import GroupInfo
from .functional import _has_kernel, draw_seed
from .layout import LAYOUTS, check_layout

Tensor = torch.Tensor

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool]
_DEVICES = ["cpu", "cuda"]
# (name, how to show a value); the vector is [MAGIC, error flag, *fields, seed].
_FIELDS = ["batch", "query heads", "key/value heads", "head dim", "value head dim",
           "query shard length", "key/value shard length", "dtype", "device type", "layout",
           "is_causal", "scale", "dropout_p", "attn_mask presence", "attn_mask dtype",
           "attn_mask key length"]
_MAGIC = 0x52494E47  # "RING": tells our vector from garbage when debugging a hang


@dataclass(frozen=True)
class Agreed:
    scale: float
    seed: Optional[Tensor]   # rank 0's dropout seed (int64 scalar, CPU); None w/o dropout
    mask: Optional[Tensor]   # attn_mask as 4-D [B|1, H|1, S_local|1, S]


class RingInputError(ValueError):
    """Raised on every rank when ranks disagree or one rank's inputs are invalid."""


def _bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _unbits(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


def _show(name: str, value: int) -> str:
    if value == -1:
        return "n/a"
    if name in ("dtype", "attn_mask dtype"):
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "?"
    if name == "device type":
        return _DEVICES[value] if 0 <= value < len(_DEVICES) else "?"
    if name == "layout":
        return repr(LAYOUTS[value]) if 0 <= value < len(LAYOUTS) else "?"
    if name in ("is_causal", "attn_mask presence"):
        return str(bool(value))
    if name in ("scale", "dropout_p"):
        return repr(_unbits(value))
    return str(value)


def _normalize_mask(mask: Tensor, q: Tensor, s_global: int) -> Tensor:
    """[..., S_local|1, S] broadcastable on batch and heads -> 4-D view."""
    if mask.dim() > 4 or mask.dim() < 2:
        raise ValueError(f"ring_attn: attn_mask must be 2-D to 4-D [..., S_local, S], got "
                         f"{mask.dim()}-D of shape {tuple(mask.shape)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    want = (q.size(0), q.size(1), q.size(2), s_global)
    names = ("batch", "heads", "queries (S_local)", "keys (S = world_size * S_local)")
    for i in range(4):
        if m.size(i) != want[i] and (m.size(i) != 1 or i == 3):
            raise ValueError(f"ring_attn: attn_mask shape {tuple(mask.shape)} does not "
                             f"broadcast to [B, Hq, S_local, S] = {list(want)}: dim {i} "
                             f"({names[i]}) is {m.size(i)}")
    return m


def _local_check(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *, is_causal: bool,
                 scale: Optional[float], dropout_p: float, layout: str,
                 info: GroupInfo) -> Optional[Tensor]:
    """Raise on inputs this rank alone can tell are wrong; return the 4-D mask."""
    check_layout(layout)
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"ring_attn: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"ring_attn: {name} must be 4-D [B, H, S_local, D], got "
                             f"{t.dim()}-D of shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES[:4]:
        raise ValueError("ring_attn: query, key, value need one floating dtype (float32, "
                         f"float64, float16, bfloat16), got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"ring_attn: query, key, value must share a device, got {q.device}, "
                         f"{k.device}, {v.device}")
    if q.device.type not in _DEVICES or not _has_kernel(q.device):
        raise NotImplementedError(f"ring_attn: no ring_attn kernel for device {q.device}")
    if "nccl" in info.backend and "gloo" not in info.backend and q.device.type != "cuda":
        raise ValueError(f"ring_attn: the group's backend is {info.backend!r}, which needs "
                         f"CUDA tensors; the inputs are on {q.device}")
    if q.device.type == "cuda" and q.device.index != torch.cuda.current_device():
        raise ValueError(f"ring_attn: inputs are on {q.device} but the current CUDA device "
                         f"is cuda:{torch.cuda.current_device()}; call "
                         "torch.cuda.set_device(local_rank) before the ring")
    b, hq, s, d = q.shape
    if k.size(0) != b or v.size(0) != b:
        raise ValueError(f"ring_attn: batch sizes differ: query {b}, key {k.size(0)}, "
                         f"value {v.size(0)}")
    if k.size(1) != v.size(1) or k.size(1) == 0 or hq % k.size(1) != 0:
        raise ValueError(f"ring_attn: query heads ({hq}) must be a multiple of key/value heads "
                         f"(key {k.size(1)}, value {v.size(1)}, which must be equal)")
    if k.size(3) != d:
        raise ValueError(f"ring_attn: key head dim must equal query's {d}, got {k.size(3)}")
    if k.size(2) != s or v.size(2) != s:
        raise ValueError("ring_attn: query, key and value shards must have the same length "
                         f"(self-attention over one sequence), got {s}, {k.size(2)}, "
                         f"{v.size(2)}")
    if layout == "zigzag" and s % 2 != 0:
        raise ValueError(f"ring_attn: a 'zigzag' shard holds two equal chunks, so its length "
                         f"must be even, got {s}; the global length must be a multiple of "
                         f"2 * world_size = {2 * info.world_size} (see ring_attn.pad_for_ring)")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"ring_attn: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None or not math.isfinite(scale):
        raise ValueError(f"ring_attn: scale must be finite, got {scale}")
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"ring_attn: attn_mask must be a Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise ValueError(f"ring_attn: attn_mask dtype must be bool or the query's {q.dtype}, "
                         f"got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"ring_attn: attn_mask must be on the query's device {q.device}, got "
                         f"{mask.device}")
    if mask.requires_grad:
        raise ValueError("ring_attn: gradients with respect to attn_mask are not supported")
    return _normalize_mask(mask, q, s * info.world_size)


def _describe(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *, is_causal: bool,
              scale: float, dropout_p: float, layout: str) -> list[int]:
    return [q.size(0), q.size(1), k.size(1), q.size(3), v.size(3), q.size(2), k.size(2),
            _DTYPES.index(q.dtype), _DEVICES.index(q.device.type), LAYOUTS.index(layout),
            int(bool(is_causal)), _bits(scale), _bits(dropout_p), int(mask is not None),
            _DTYPES.index(mask.dtype) if mask is not None else -1,
            mask.size(-1) if mask is not None else -1]


def _wire_device(info: GroupInfo) -> torch.device:
    """Where the agreement vector lives: CPU whenever the group has gloo (also in a mixed
    "cpu:gloo,cuda:nccl" group, so every rank picks the same backend whatever its inputs),
    the current CUDA device for an NCCL-only group."""
    if "nccl" in info.backend and "gloo" not in info.backend:
        if not torch.cuda.is_available():
            raise RuntimeError(f"ring_attn: the group's backend is {info.backend!r} but CUDA "
                               "is not available in this process")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *,
                    is_causal: bool, scale: Optional[float], dropout_p: float, layout: str,
                    info: GroupInfo) -> Agreed:
    """Check this rank's inputs and that every rank of the group agrees; raise
    RingInputError on every rank otherwise. Returns the agreed scale, seed and mask."""
    error: Optional[BaseException] = None
    mask4 = None
    try:
        mask4 = _local_check(q, k, v, mask, is_causal=is_causal, scale=scale,
                             dropout_p=dropout_p, layout=layout, info=info)
        fields = _describe(q, k, v, mask, is_causal=is_causal, scale=scale,
                           dropout_p=dropout_p, layout=layout)
    except (TypeError, ValueError, NotImplementedError) as e:
        if info.world_size == 1:
            raise
        error, fields = e, [-1] * len(_FIELDS)
    # Every rank draws (keeping torch's generator in step across ranks); rank 0's is used.
    seed = int(draw_seed()) if dropout_p > 0.0 and error is None else 0
    row = [_MAGIC, int(error is not None), *fields, seed]
    if info.world_size == 1:
        rows = [row]
    else:
        mine = torch.tensor(row, dtype=torch.int64, device=_wire_device(info))
        gathered = [torch.empty_like(mine) for _ in range(info.world_size)]
        dist.all_gather(gathered, mine, group=info.group)
        rows = torch.stack(gathered).cpu().tolist()
    bad = [r for r, row_r in enumerate(rows) if row_r[1] != 0]
    if bad:
        if error is not None:
            raise RingInputError(f"ring_attn: rank {info.rank}: {error}") from error
        raise RingInputError(f"ring_attn: rank(s) {bad} rejected their inputs (see the error "
                             f"raised there); this rank ({info.rank}) stops too")
    for i, name in enumerate(_FIELDS):
        values = [row_r[2 + i] for row_r in rows]
        if any(x != values[0] for x in values):
            diff = ", ".join(f"rank {r} has {_show(name, x)}"
                             for r, x in enumerate(values) if x != values[0])
            raise RingInputError(f"ring_attn: ranks disagree on {name}: rank 0 has "
                                 f"{_show(name, values[0])}, {diff}")
    seed_t = torch.tensor(rows[0][-1], dtype=torch.int64) if dropout_p > 0.0 else None
    return Agreed(float(scale), seed_t, mask4)
