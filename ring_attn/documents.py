"""Document boundaries of packed sequences (cu_seqlens): the one check every entry point
runs before any kernel or transfer.

cu_seqlens is flash-attn's format: cumulative document lengths [0, L0, L0 + L1, ..., T],
1-D, int32 or int64, non-decreasing (a repeated value is an empty document). The kernels
find each position's document with a binary search (csrc/attn_host.cpp), so a malformed
tensor would silently attend across documents; it is refused here instead.
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import RingAttnError, RingAttnTypeError

Tensor = torch.Tensor


def check_cu_seqlens(cu: object, total: Optional[int], name: str = "cu_seqlens",
                     device: Optional[torch.device] = None) -> tuple[int, ...]:
    """Validates cu_seqlens for `total` packed tokens (None: any total) and returns it as
    a tuple of ints (one host copy: a sync on CUDA, once per call). device: where it must
    live (the inputs' device), None for anywhere."""
    if not isinstance(cu, Tensor):
        raise RingAttnTypeError(f"ring_attn: {name} must be a Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise RingAttnError(f"ring_attn: {name} must be int32 or int64, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise RingAttnError(f"ring_attn: {name} must be 1-D with at least one element "
                            f"[0, L0, L0 + L1, ..., total], got shape {tuple(cu.shape)}")
    if device is not None and cu.device != device:
        raise RingAttnError(f"ring_attn: {name} must be on the inputs' device {device}, "
                            f"got {cu.device}")
    values = tuple(int(x) for x in cu.tolist())
    if values[0] != 0:
        raise RingAttnError(f"ring_attn: {name} must start at 0, got {values[0]}")
    for d in range(1, len(values)):
        if values[d] < values[d - 1]:
            raise RingAttnError(f"ring_attn: {name} must be non-decreasing, got "
                                f"{name}[{d - 1}] = {values[d - 1]} > {name}[{d}] = {values[d]}")
    if total is not None and values[-1] != total:
        raise RingAttnError(f"ring_attn: {name} must end at the token count {total}, got "
                            f"{values[-1]}")
    return values


def check_max_seqlen(max_seqlen: object, cu: tuple[int, ...], name: str) -> None:
    """flash-attn's max_seqlen_q / max_seqlen_k: not needed by ring_attn, but when given it
    must be an int >= the longest document (flash-attn sizes its launch grid with it, so
    a smaller value would be a silent error there and is a bug in the caller here)."""
    if max_seqlen is None:
        return
    if isinstance(max_seqlen, Tensor) and max_seqlen.dim() == 0 and \
            not max_seqlen.dtype.is_floating_point:
        max_seqlen = int(max_seqlen.item())
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise RingAttnTypeError(f"ring_attn: {name} must be an int or None, got "
                                f"{type(max_seqlen).__name__} {max_seqlen!r}")
    longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
    if max_seqlen < longest:
        raise RingAttnError(f"ring_attn: {name} must be >= the longest document ({longest} "
                            f"tokens), got {max_seqlen}")


def cu_seqlens_from_position_ids(position_ids: Tensor) -> Tensor:
    """cu_seqlens (int32, position_ids' device) of a Hugging Face style packed batch:
    position_ids [T] or [1, T] restart at 0 at each document (0, 1, ..., L0 - 1, 0, 1,
    ...), as DataCollatorWithFlattening produces. A document starts at index 0 and at
    every 0 after it. A batch of several rows (pack them into one row first), a negative
    position or a decrease that is not a restart to 0 (two documents run together, or
    positions that were shuffled) is refused, naming the first offending index."""
    if not isinstance(position_ids, Tensor):
        raise RingAttnTypeError("ring_attn: position_ids must be a Tensor, got "
                                f"{type(position_ids).__name__}")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or \
            position_ids.dtype == torch.bool:
        raise RingAttnError("ring_attn: position_ids must be an integer tensor, got "
                            f"{position_ids.dtype}")
    p = position_ids
    if p.dim() == 2 and p.size(0) == 1:
        p = p[0]
    if p.dim() != 1:
        raise RingAttnError("ring_attn: position_ids must be [T] or [1, T] (one packed row; "
                            f"pack a batch into one row first), got shape {tuple(p.shape)}")
    p = p.to(torch.int64)
    if p.numel() and bool((p < 0).any()):
        i = int((p < 0).nonzero()[0])
        raise RingAttnError(f"ring_attn: position_ids must be >= 0, got position_ids[{i}] = "
                            f"{int(p[i])}")
    starts = torch.ones(p.shape, dtype=torch.bool, device=p.device)
    if p.numel() > 1:
        starts[1:] = p[1:] == 0
        bad = (p[1:] < p[:-1]) & ~starts[1:]
        if bool(bad.any()):
            i = int(bad.nonzero()[0]) + 1
            raise RingAttnError(
                "ring_attn: position_ids must increase within a document and restart at 0 "
                f"for the next, got position_ids[{i - 1}] = {int(p[i - 1])} then "
                f"position_ids[{i}] = {int(p[i])}")
    end = torch.tensor([p.numel()], dtype=torch.int64, device=p.device)
    return torch.cat([starts.nonzero().flatten(), end]).to(torch.int32)
