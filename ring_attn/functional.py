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

The rules and the broadcasting are the C++ op ring_attn::sdpa (csrc/api/attention.cpp),
which the C++ API calls too; this module checks only what C++ cannot see (the Python
types of the arguments) and calls it.

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

from . import ops  # noqa: F401  (loads the library and registers the fake kernels)
from .errors import RingAttnError, RingAttnIndexError, RingAttnTypeError, call_op

Tensor = torch.Tensor


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


def check_argument_types(query: object, key: object, value: object, attn_mask: object,
                         dropout_p: object, is_causal: object, scale: object,
                         enable_gqa: object) -> tuple[float, Optional[float]]:
    """The checks only Python can make, on the Python objects passed (torch's parser
    raises TypeError for each: a non-tensor, an int is_causal, a str dropout_p), with the
    numbers torch accepts as 0-D tensors converted. Returns (dropout_p, scale) as floats.
    Every rule on the values is the C++ op's (csrc/api/attention.cpp)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t)
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask)
    dropout_p = check_dropout_p(dropout_p)
    check_bool("is_causal", is_causal)
    scale = check_scale(scale)
    check_bool("enable_gqa", enable_gqa)
    return dropout_p, scale


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
    """The one single-device implementation behind both entry points: the op
    ring_attn::sdpa (csrc/api/attention.cpp), which checks the values, broadcasts to the
    kernel's 4-D views, draws the dropout seed and calls attn_fwd, whose autograd is
    C++ too."""
    dropout_p, scale = check_argument_types(query, key, value, attn_mask, dropout_p,
                                            is_causal, scale, enable_gqa)
    left, right = check_window(window) or (-1, -1)
    softcap = check_softcap(softcap)
    return call_op(torch.ops.ring_attn.sdpa.default, query, key, value, attn_mask, dropout_p,
                   is_causal, scale, enable_gqa, left, right, softcap, None)
