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


def check_cu_seqlens(cu: object, total: int, name: str = "cu_seqlens",
                     device: Optional[torch.device] = None) -> tuple[int, ...]:
    """Validates cu_seqlens for `total` packed tokens and returns it as a tuple of ints
    (one host copy: a sync on CUDA, once per call). device: where it must live (the
    inputs' device), None for anywhere."""
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
    if values[-1] != total:
        raise RingAttnError(f"ring_attn: {name} must end at the token count {total}, got "
                            f"{values[-1]}")
    return values
