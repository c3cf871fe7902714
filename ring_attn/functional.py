"""`scaled_dot_product_attention`: a drop-in for torch's, computed by the ring_attn kernels.

Same signature and semantics as torch.nn.functional.scaled_dot_product_attention: inputs
[..., L, E] / [..., S, E] / [..., S, Ev] with batch dims broadcast, the head dim -3 mapped
for GQA when enable_gqa (and broadcast from a single head otherwise, as torch's math
backend does), top-left causal alignment when L != S, bool or additive masks (bool,
float32 or the query's dtype) broadcastable to [..., L, S], scale=None -> 1/sqrt(E),
dropout applied whenever dropout_p > 0 with a seed drawn from torch's default generator.
Rows whose keys are all masked out give 0 (as torch's public SDPA does). Meta tensors
give shapes only; under torch.compile the function traces without graph breaks.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops

Tensor = torch.Tensor
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _has_kernel(device: torch.device) -> bool:
    return _has_kernel_for(device.type)


@torch.compiler.assume_constant_result
def _has_kernel_for(device_type: str) -> bool:
    # Meta tensors run the registered fake kernel (shapes only), as torch's SDPA does.
    # A constant for torch.compile: dynamo cannot trace the dispatcher query itself.
    key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "ring_attn::attn_fwd", key)


def validate_inputs(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                    dropout_p: float, is_causal: bool, scale: Optional[float],
                    enable_gqa: bool) -> None:
    """Raise, naming the argument, the expected and the actual value, on any input torch's
    SDPA rejects (and on dropout_p outside [0, 1), which torch lets through)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"ring_attn: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"ring_attn: {name} must be at least 2-D [..., L, E], got "
                             f"{t.dim()}-D of shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError("ring_attn: query, key and value must have the same dtype, got "
                         f"query {query.dtype}, key {key.dtype}, value {value.dtype}")
    if query.dtype not in _FLOAT_DTYPES:
        raise ValueError("ring_attn: query dtype must be one of float32, float64, float16, "
                         f"bfloat16, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError("ring_attn: query, key and value must be on the same device, got "
                         f"query {query.device}, key {key.device}, value {value.device}")
    if not _has_kernel(query.device):
        raise NotImplementedError(
            f"ring_attn: no kernel for device {query.device} (this build has: "
            f"{', '.join(d for d in ('cpu', 'cuda') if _has_kernel(torch.device(d)))}); "
            "move the inputs or rebuild with CUDA")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"ring_attn: key head dim must equal query's {query.shape[-1]}, "
                         f"got {key.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"ring_attn: value length must equal key's {key.shape[-2]}, got "
                         f"{value.shape[-2]}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"ring_attn: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"ring_attn: scale must be finite or None, got {scale}")
    if attn_mask is not None:
        if is_causal:
            raise ValueError("ring_attn: attn_mask must be None when is_causal=True "
                             "(torch's rule: an explicit mask and is_causal are exclusive)")
        # torch's rule: bool, float32, or the query's dtype.
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise ValueError("ring_attn: attn_mask dtype must be bool, float32 or match "
                             f"query's {query.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"ring_attn: attn_mask must be on query's device {query.device}, "
                             f"got {attn_mask.device}")
    _head_counts(query, key, value, enable_gqa)


def _heads(t: Tensor) -> int:
    return t.shape[-3] if t.dim() >= 3 else 1


def _head_counts(query: Tensor, key: Tensor, value: Tensor, enable_gqa: bool
                 ) -> tuple[int, int]:
    """(query heads, key/value heads) the kernel sees, or raise naming the arguments.

    Heads broadcast like batch dims, as in torch's math backend: one key (or value) head
    serves any number of value (key) heads, one query head any number of KV heads.
    Otherwise query heads must equal KV heads, or be a multiple with enable_gqa."""
    hq, hk, hv = _heads(query), _heads(key), _heads(value)
    if hk != hv and 1 not in (hk, hv):
        raise ValueError(f"ring_attn: key and value head counts differ: key {hk}, value {hv}")
    hkv = max(hk, hv) if hk != hv else hk
    if hq == hkv:
        return hq, hkv
    if enable_gqa:
        if hkv == 0 or hq % hkv != 0:
            raise ValueError(f"ring_attn: query heads ({hq}) must be a multiple of key/value "
                             f"heads ({hkv}) with enable_gqa=True")
        return hq, hkv
    if hq == 1:
        return hkv, hkv
    if hkv == 1:
        return hq, 1  # the kernel's GQA mapping with one group: no copy of K/V
    raise ValueError(f"ring_attn: query has {hq} heads but key/value have {hkv}; "
                     "pass enable_gqa=True for grouped-query attention")


def _batch_shape(query: Tensor, key: Tensor, value: Tensor) -> tuple[int, ...]:
    """Broadcast batch dims (everything before the head dim -3)."""
    lead = [t.shape[:-3] if t.dim() >= 3 else torch.Size() for t in (query, key, value)]
    try:
        return tuple(torch.broadcast_shapes(*lead))
    except RuntimeError as e:
        raise ValueError(f"ring_attn: batch dims of query {tuple(lead[0])}, key "
                         f"{tuple(lead[1])} and value {tuple(lead[2])} do not broadcast") from e


def _to_4d(t: Tensor, batch: tuple[int, ...], heads: int) -> Tensor:
    """[..., H, S, E] -> [B, heads, S, E]: batch dims and a single head broadcast with
    stride 0 (no copy unless several broadcast batch dims must merge)."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    t = t.expand(*batch, heads, *t.shape[-2:])
    return t.reshape(math.prod(batch), *t.shape[-3:]) if len(batch) != 1 else t


def _mask_to_4d(mask: Tensor, batch: tuple[int, ...], hq: int, lq: int, lk: int) -> Tensor:
    full = (*batch, hq, lq, lk)
    try:
        mask = mask.expand(full) if mask.dim() <= len(full) else None
    except RuntimeError:
        mask = None
    if mask is None:
        raise ValueError(f"ring_attn: attn_mask shape does not broadcast to {full}")
    if len(batch) != 1:
        mask = mask.reshape(math.prod(batch), hq, lq, lk)
    return mask


def draw_seed() -> Tensor:
    """A dropout seed from torch's default generator (so torch.manual_seed governs it)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor,
                                 attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Exact attention, a drop-in for torch.nn.functional.scaled_dot_product_attention."""
    validate_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    batch = _batch_shape(query, key, value)
    e = query.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(e) if e > 0 else 1.0
    hq, hkv = _head_counts(query, key, value, enable_gqa)
    q4 = _to_4d(query, batch, hq)
    k4, v4 = (_to_4d(t, batch, hkv) for t in (key, value))
    hq, lq, lk = q4.shape[1], q4.shape[2], k4.shape[2]
    mask4 = None if attn_mask is None else _mask_to_4d(attn_mask, batch, hq, lq, lk)
    seed = draw_seed() if dropout_p > 0.0 else None
    out, _ = ops.attn_fwd(q4, k4, v4, mask4, None, None, 0, 0, bool(is_causal), float(scale),
                          float(dropout_p), seed, False)
    # Output rank is the largest input rank, as with torch's broadcasting matmuls.
    full = (*batch, hq, lq, value.shape[-1])
    rank = max(query.dim(), key.dim(), value.dim())
    return out.reshape(full[len(full) - rank:] if rank < len(full) else full)
