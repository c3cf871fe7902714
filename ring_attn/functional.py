"""`scaled_dot_product_attention`: a drop-in for torch's, computed by the ring_attn kernels;
and `attention`, the same entry with sliding windows and soft-capped scores.

Same signature and semantics as torch.nn.functional.scaled_dot_product_attention: inputs
[..., L, E] / [..., S, E] / [..., S, Ev] with batch dims broadcast, the head dim -3 mapped
for GQA when enable_gqa (and broadcast from a single head otherwise, as torch's math
backend does), top-left causal alignment when L != S, bool or additive masks (bool,
float32 or the query's dtype) broadcastable to [..., L, S], scale=None -> 1/sqrt(E),
dropout applied whenever dropout_p > 0 with a seed drawn from torch's default generator.
Rows whose keys are all masked out give 0 (as torch's public SDPA does); NaN/inf propagate
exactly as in torch's math backend. Inputs torch rejects raise torch's exception type
(errors.py); a double backward (create_graph=True) raises. Meta tensors
give shapes only; under torch.compile the function traces without graph breaks.

`attention(..., window=(left, right), softcap=...)` shares that code path and adds the
band and soft-capping of the kernels (csrc/common/attn_params.h): query i sees key j iff
i - left <= j <= i + right (flash-attn's convention, -1 unbounded; positions top-left
aligned as for is_causal, so is_causal is window right = 0), and scores become
softcap * tanh(score / softcap) before the mask.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import ops
from .errors import (RingAttnError, RingAttnIndexError, RingAttnNotImplementedError,
                     RingAttnTypeError)

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


def check_tensor(name: str, t: object) -> None:
    if not isinstance(t, Tensor):
        raise RingAttnTypeError(f"ring_attn: {name} must be a Tensor, got {type(t).__name__}")


def check_bool(name: str, value: object) -> bool:
    """torch's argument parser takes only a Python bool for is_causal / enable_gqa (an
    int, a str, None or a 0-D tensor is a TypeError)."""
    if not isinstance(value, bool):
        raise RingAttnTypeError(f"ring_attn: {name} must be bool, got "
                                f"{type(value).__name__} {value!r}")
    return value


def check_dropout_p(value: object) -> float:
    """dropout_p as a float in [0, 1). Like torch: a Python number or a 0-D tensor (torch
    accepts both) is converted, anything else is a TypeError. Unlike torch, 1.0 is
    refused too (torch returns zeros; the kernels' 1 / (1 - p) has no value there)."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if not isinstance(value, (int, float)):  # a bool is an int, as torch's parser takes it
        raise RingAttnTypeError("ring_attn: dropout_p must be a float (or a 0-D tensor), "
                                f"got {type(value).__name__} {value!r}")
    p = float(value)
    if not 0.0 <= p < 1.0:
        raise RingAttnError(f"ring_attn: dropout_p must be in [0, 1), got {value!r}")
    return p


def check_scale(value: object) -> Optional[float]:
    """scale as None or a finite float. A Python number or 0-D tensor is accepted as
    torch does; a str (etc.) is a TypeError. A non-finite scale, which torch lets
    through to an all-NaN result, is refused."""
    if value is None:
        return None
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if not isinstance(value, (int, float)):
        raise RingAttnTypeError(f"ring_attn: scale must be a float or None, got "
                                f"{type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise RingAttnError(f"ring_attn: scale must be finite or None, got {value}")
    return float(value)


def check_window(window: object) -> Optional[tuple[int, int]]:
    """window as (left, right) ints, flash-attn's convention: -1 is unbounded on that side;
    None is no window (returned as None). A non-pair or non-int element is a TypeError (as
    torch's parser raises for a wrong type); a bound below -1 a RingAttnError. The one
    check of every entry point (one device, the ring, the simulated ring)."""
    if window is None:
        return None
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool)
                       for w in window)):
        raise RingAttnTypeError("ring_attn: window must be None or a pair of ints (left, right), "
                                f"-1 for unbounded, got {type(window).__name__} {window!r}")
    for side, w in zip(("left", "right"), window):
        if w < -1:
            raise RingAttnError(f"ring_attn: window {side} bound must be >= 0, or -1 for "
                                f"unbounded, got window={tuple(window)!r}")
    return int(window[0]), int(window[1])


def check_softcap(value: object) -> float:
    """softcap as a float, 0.0 for off (None or 0). A Python number or a 0-D tensor is
    accepted, as for scale; anything else (a bool, a str) is a TypeError; a negative or
    non-finite value a RingAttnError."""
    if value is None:
        return 0.0
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RingAttnTypeError("ring_attn: softcap must be a float or None, got "
                                f"{type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise RingAttnError("ring_attn: softcap must be finite and > 0 (or None / 0 for off), "
                            f"got {value}")
    return float(value)


def check_mask_type(attn_mask: object) -> None:
    """attn_mask must be a tensor of at least 2 dims [..., L, S] (torch: TypeError for a
    non-tensor, IndexError for 0-D and 1-D masks, whose dim -2 does not exist)."""
    if attn_mask is None:
        return
    check_tensor("attn_mask", attn_mask)
    if attn_mask.dim() < 2:
        raise RingAttnIndexError(f"ring_attn: attn_mask must be at least 2-D [..., L, S], "
                                 f"got {attn_mask.dim()}-D of shape {tuple(attn_mask.shape)}")


def validate_inputs(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                    dropout_p: float, is_causal: bool, scale: Optional[float],
                    enable_gqa: bool) -> tuple[float, Optional[float]]:
    """Raise, naming the argument, the expected and the actual value, on any input torch's
    SDPA rejects (with torch's exception type, see errors.py), and on dropout_p = 1 or a
    non-finite scale, which torch lets through. Returns (dropout_p, scale) as floats."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
    check_mask_type(attn_mask)
    dropout_p = check_dropout_p(dropout_p)
    check_bool("is_causal", is_causal)
    scale = check_scale(scale)
    check_bool("enable_gqa", enable_gqa)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            raise RingAttnError(f"ring_attn: {name} must be at least 2-D [..., L, E], got "
                                f"{t.dim()}-D of shape {tuple(t.shape)}")
    if not (query.device.type == key.device.type == value.device.type):
        raise RingAttnError("ring_attn: query, key and value must be on the same device, got "
                            f"query {query.device}, key {key.device}, value {value.device}")
    if not (query.dtype == key.dtype == value.dtype):
        raise RingAttnError("ring_attn: query, key and value must have the same dtype, got "
                            f"query {query.dtype}, key {key.dtype}, value {value.dtype}")
    if query.dtype not in _FLOAT_DTYPES:
        # torch: NotImplementedError for complex and float8 (no kernel for the dtype),
        # RuntimeError for integer and bool ("expected scalar type Float").
        exotic = query.dtype.is_complex or query.dtype.is_floating_point
        kind = RingAttnNotImplementedError if exotic else RingAttnError
        raise kind("ring_attn: query dtype must be one of float32, float64, float16, "
                   f"bfloat16, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise RingAttnError("ring_attn: query, key and value must be on the same device, got "
                            f"query {query.device}, key {key.device}, value {value.device}")
    if not _has_kernel(query.device):
        raise RingAttnNotImplementedError(
            f"ring_attn: no kernel for device {query.device} (this build has: "
            f"{', '.join(d for d in ('cpu', 'cuda') if _has_kernel(torch.device(d)))}); "
            "move the inputs or rebuild with CUDA")
    if key.shape[-1] != query.shape[-1]:
        raise RingAttnError(f"ring_attn: key head dim must equal query's {query.shape[-1]}, "
                            f"got {key.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise RingAttnError(f"ring_attn: value length must equal key's {key.shape[-2]}, got "
                            f"{value.shape[-2]}")
    if attn_mask is not None:
        if is_causal:
            raise RingAttnError("ring_attn: attn_mask must be None when is_causal=True "
                                "(torch's rule: an explicit mask and is_causal are exclusive)")
        # torch's rule: bool, float32, or the query's dtype.
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RingAttnError("ring_attn: attn_mask dtype must be bool, float32 or match "
                                f"query's {query.dtype}, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise RingAttnError(f"ring_attn: attn_mask must be on query's device "
                                f"{query.device}, got {attn_mask.device}")
    _head_counts(query, key, value, enable_gqa)
    return dropout_p, scale


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
        raise RingAttnError(f"ring_attn: key and value head counts differ: key {hk}, "
                            f"value {hv}")
    hkv = max(hk, hv) if hk != hv else hk
    if hq == hkv:
        return hq, hkv
    if enable_gqa:
        if hkv == 0 or hq % hkv != 0:
            raise RingAttnError(f"ring_attn: query heads ({hq}) must be a multiple of key/value "
                                f"heads ({hkv}) with enable_gqa=True")
        return hq, hkv
    if hq == 1:
        return hkv, hkv
    if hkv == 1:
        return hq, 1  # the kernel's GQA mapping with one group: no copy of K/V
    raise RingAttnError(f"ring_attn: query has {hq} heads but key/value have {hkv}; "
                        "pass enable_gqa=True for grouped-query attention")


def _batch_shape(query: Tensor, key: Tensor, value: Tensor) -> tuple[int, ...]:
    """Broadcast batch dims (everything before the head dim -3)."""
    lead = [t.shape[:-3] if t.dim() >= 3 else torch.Size() for t in (query, key, value)]
    try:
        return tuple(torch.broadcast_shapes(*lead))
    except RuntimeError as e:
        raise RingAttnError(f"ring_attn: batch dims of query {tuple(lead[0])}, key "
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
    shape = tuple(mask.shape)
    try:
        mask = mask.expand(full) if mask.dim() <= len(full) else None
    except RuntimeError:
        mask = None
    if mask is None:
        raise RingAttnError(f"ring_attn: attn_mask shape {shape} does not broadcast to "
                            f"[..., L, S] = {full}")
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
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                      None, None)


def attention(query: Tensor, key: Tensor, value: Tensor, *, is_causal: bool = False,
              window: Optional[tuple[int, int]] = None, softcap: Optional[float] = None,
              attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """scaled_dot_product_attention with a sliding window and soft-capped scores.

    window=(left, right): query i sees keys i - left ... i + right (-1: unbounded on that
    side; None: no window), on top-left aligned positions like is_causal, which is
    right = 0 (so window=(left, 0) is causal with a window and combines with attn_mask).
    softcap > 0: scores become softcap * tanh(score / softcap) before the mask (Gemma 2);
    None or 0 is off. Everything else as scaled_dot_product_attention."""
    return _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                      window, softcap)


def _attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
               dropout_p: float, is_causal: bool, scale: Optional[float], enable_gqa: bool,
               window: object, softcap: object) -> Tensor:
    """The one single-device implementation behind both entry points."""
    dropout_p, scale = validate_inputs(query, key, value, attn_mask, dropout_p, is_causal,
                                       scale, enable_gqa)
    left, right = check_window(window) or (-1, -1)
    softcap = check_softcap(softcap)
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
                          float(dropout_p), seed, False, None, None, left, right, softcap)
    # Output rank is the largest input rank, as with torch's broadcasting matmuls.
    full = (*batch, hq, lq, value.shape[-1])
    rank = max(query.dim(), key.dim(), value.dim())
    return out.reshape(full[len(full) - rank:] if rank < len(full) else full)
