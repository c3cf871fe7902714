"""`sequence_parallel`: run an unmodified model's attention as ring attention.

    with ring_attn.sequence_parallel(group=None, layout="zigzag"):
        out = model(ring_attn.shard(tokens, dim=1))   # any F.scaled_dot_product_attention
                                                      # inside is now ring attention

Inside the context, `torch.nn.functional.scaled_dot_product_attention` is replaced by a
function with the same signature that calls `ring_attn.ring_attention` on this rank's
shards: query/key/value are [..., H, S_local, E], the output is this rank's shard, and
autograd returns this rank's shards of the gradients. Causal masking uses the tokens'
*global* positions of `layout`, so the model must feed the sequence sharded with the same
layout (`ring_attn.shard(x, dim=..., layout=layout)`) and, for RoPE and the like, take
positions from `ring_attn.positions(s_local, layout=layout)`.

An `attn_mask` passed through the patched function is the ring's mask: rows are this
rank's queries, columns the full sequence, shape broadcastable to [..., S_local, S_full]
(see `ring_attn.ring_attention`).

Design, in four rules:
  * The patch is an attribute swap on the `torch.nn.functional` module, so every caller
    that looks the function up there at call time is patched: `F.scaled_dot_product_attention(...)`
    and torch's own `F.multi_head_attention_forward`. Code that bound the function object
    itself before entering (`from torch.nn.functional import scaled_dot_product_attention`,
    or `torch._C._nn.scaled_dot_product_attention`) is NOT patched.
  * Contexts nest: each one remembers the attribute it found on entry and puts it back on
    exit (also when the body raises); the innermost settings (group, layout) win.
  * `sequence_parallel(enabled=False)` turns the patch off for its body: inside it the
    attribute is torch's original function again, e.g. for a single-device reference or a
    local attention inside a sequence-parallel model. On exit the outer patch returns.
  * The swap is process-global (a module attribute is), so contexts must be entered and
    exited in LIFO order; other threads see the patched function while a context is open.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .layout import LAYOUTS
from .ring import ring_attention

Tensor = torch.Tensor


@dataclass
class _Frame:
    group: Optional[Any]            # torch.distributed ProcessGroup, None = default group
    layout: str
    enabled: bool
    previous: Callable[..., Tensor]  # F.scaled_dot_product_attention found on entry


_lock = threading.Lock()
_stack: list[_Frame] = []


def _original_sdpa() -> Callable[..., Tensor]:
    """The function F.scaled_dot_product_attention held before the outermost context."""
    return _stack[0].previous if _stack else F.scaled_dot_product_attention


def _flatten_batch(t: Tensor, lead: tuple[int, ...]) -> Tensor:
    """[*lead, H, S, E] -> [B, H, S, E]; [H, S, E] -> [1, H, S, E]."""
    if t.dim() == 3:
        return t.unsqueeze(0)
    if t.shape[:-3] != lead:
        raise ValueError("ring_attn.sequence_parallel: query, key and value must share batch "
                         f"dims {tuple(lead)}, got {tuple(t.shape[:-3])} (batch broadcasting "
                         "is not supported on the ring)")
    return t.reshape(-1, *t.shape[-3:])


def _ring_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
               enable_gqa: bool = False) -> Tensor:
    """scaled_dot_product_attention on sequence shards: ring attention over the group of the
    innermost `sequence_parallel` context (see the module docstring for the mask rule)."""
    frame = _stack[-1] if _stack else None
    if frame is None or not frame.enabled:
        # Reached only through a reference taken while a context was open.
        return _original_sdpa()(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 3:
            raise ValueError(f"ring_attn.sequence_parallel: {name} must be [..., H, S_local, E] "
                             f"(at least 3-D), got shape {tuple(t.shape)}")
    hq, hk = query.shape[-3], key.shape[-3]
    if hq != hk and not enable_gqa:
        raise ValueError(f"ring_attn.sequence_parallel: query has {hq} heads but key/value "
                         f"have {hk}; pass enable_gqa=True for grouped-query attention")
    lead = tuple(query.shape[:-3])
    q, k, v = (_flatten_batch(t, lead) for t in (query, key, value))
    mask = attn_mask
    if mask is not None and (query.dim() != 4 or mask.dim() > 4):
        mask = mask.expand(*lead, hq, q.shape[2], mask.shape[-1]).reshape(
            -1, hq, q.shape[2], mask.shape[-1])
    out = ring_attention(q, k, v, is_causal=bool(is_causal), scale=scale, attn_mask=mask,
                         dropout_p=float(dropout_p), group=frame.group, layout=frame.layout)
    return out.reshape(*lead, *out.shape[1:]) if query.dim() != 4 else out


class sequence_parallel:
    """Context manager: inside it, F.scaled_dot_product_attention is ring attention.

    Args:
      group: the process group whose ranks hold the sequence shards (None: the default).
      layout: how the sequence was sharded: "zigzag" (default), "contiguous" or "striped";
        must match the layout given to ring_attn.shard / ring_attn.positions.
      enabled: False turns the patch off inside the body (torch's function is restored
        there and the outer context's patch comes back on exit).

    Returns itself from __enter__. See the module docstring for what is and is not patched.
    """

    def __init__(self, group: Optional[Any] = None, layout: str = "zigzag",
                 enabled: bool = True) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"ring_attn.sequence_parallel: layout must be one of {LAYOUTS}, "
                             f"got {layout!r}")
        self.group = group
        self.layout = layout
        self.enabled = bool(enabled)
        self._frame: Optional[_Frame] = None

    def __enter__(self) -> "sequence_parallel":
        if self._frame is not None:
            raise RuntimeError("ring_attn.sequence_parallel: this context is already active; "
                               "create a new one to nest")
        with _lock:
            base = _original_sdpa()
            frame = _Frame(self.group, self.layout, self.enabled,
                           previous=F.scaled_dot_product_attention)
            _stack.append(frame)
            F.scaled_dot_product_attention = _ring_sdpa if self.enabled else base
            self._frame = frame
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        frame = self._frame
        with _lock:
            if frame is None or not _stack or _stack[-1] is not frame:
                raise RuntimeError("ring_attn.sequence_parallel: contexts exited out of order "
                                   "(they must nest, last entered first exited)")
            _stack.pop()
            self._frame = None
            F.scaled_dot_product_attention = frame.previous
