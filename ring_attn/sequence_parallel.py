"""`sequence_parallel`: run an unmodified model's attention as ring attention.

    tok = ring_attn.shard(tokens, dim=1, layout="zigzag")          # this rank's tokens
    pos = ring_attn.positions(tok.size(1), layout="zigzag")        # their GLOBAL positions
    with ring_attn.sequence_parallel(group=None, layout="zigzag"):
        out = model(tok, position_ids=pos.unsqueeze(0))  # any F.scaled_dot_product_attention
                                                         # inside is now ring attention

Without position_ids most models put RoPE at local positions 0..S_local-1 — wrong on
every rank but the first, silently. (Hugging Face models: use
`ring_attn.integrations.transformers`, which also handles their masks, labels and cache.)

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

A mask whose key dimension is S_local (not S) is refused with an explanation: it was
almost certainly built on local positions (a causal mask from the shard's length, or
transformers' packed-sequence detection reading zigzag position_ids as several sequences).

Activation checkpointing: the recompute of a checkpointed region runs during backward,
which is usually after the context has exited. So that it never meets torch's unpatched
SDPA on shards, each ring call made inside torch.utils.checkpoint (either mode) is
recorded, and when the outermost context exits with such calls not yet recomputed,
F.scaled_dot_product_attention becomes a guard instead of torch's function: calls made
during a backward pass (the recompute) run the ring with the recorded group and layout,
other calls go to torch's function; the guard removes itself once every recorded call has
been recomputed (or when the next context is entered, which takes over).

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

import os
import sys
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .parallel.strategy import check_strategy, strategy_attention, world_size

Tensor = torch.Tensor


@dataclass
class _Frame:
    group: Optional[Any]            # torch.distributed ProcessGroup, None = default group
    layout: str
    enabled: bool
    previous: Callable[..., Tensor]  # F.scaled_dot_product_attention found on entry
    strategy: str = "ring"          # "ring" | "ulysses" | "hybrid" (parallel/strategy.py)
    mesh: Optional[Any] = None      # the hybrid's DeviceMesh or (ulysses, ring) groups


_lock = threading.Lock()
_stack: list[_Frame] = []
# The frame (group, layout, strategy, mesh) of each call made under activation
# checkpointing whose recompute (in backward) has not run yet, oldest first.
_pending: list[_Frame] = []
_CHECKPOINT_FILE = os.path.join("torch", "utils", "checkpoint.py")


def _original_sdpa() -> Callable[..., Tensor]:
    """The function F.scaled_dot_product_attention held before the outermost context
    (behind the recompute guard, if that is what it held)."""
    fn = _stack[0].previous if _stack else F.scaled_dot_product_attention
    return getattr(fn, "_ring_attn_inner", fn)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _under_checkpoint() -> bool:
    """True when called (indirectly) from torch.utils.checkpoint: its forward runs the
    region from a frame of that file in both modes. ~50 frames walked, once per call."""
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.endswith(_CHECKPOINT_FILE):
            return True
        f = f.f_back
    return False


def _note_checkpoint(frame: _Frame) -> None:
    """Record a ring call a checkpoint will recompute, or consume the record of one
    being recomputed now."""
    if torch.compiler.is_compiling():
        return
    if _in_backward():
        if _pending:
            _pending.pop()
    elif _under_checkpoint():
        _pending.append(frame)


def _recompute_guard(*args: Any, **kwargs: Any) -> Tensor:
    """Installed as F.scaled_dot_product_attention after the last context exits while
    checkpointed ring calls still await their recompute (see the module docstring)."""
    inner = _recompute_guard._ring_attn_inner
    if not (_in_backward() and _pending):
        return inner(*args, **kwargs)
    f = _pending[-1]
    _stack.append(_Frame(f.group, f.layout, True, previous=inner, strategy=f.strategy,
                         mesh=f.mesh))
    try:
        return _ring_sdpa(*args, **kwargs)
    finally:
        _stack.pop()
        with _lock:
            if not _pending and not _stack and F.scaled_dot_product_attention is _recompute_guard:
                F.scaled_dot_product_attention = inner


_recompute_guard._ring_attn_inner = F.scaled_dot_product_attention


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
    s_local = query.shape[-2]
    world = world_size(frame.strategy, frame.group, frame.mesh) if attn_mask is not None \
        and dist.is_initialized() else 1
    if world > 1 and attn_mask.dim() >= 1 and attn_mask.shape[-1] == s_local:
        raise ValueError(
            f"ring_attn.sequence_parallel: attn_mask has {s_local} key columns, this rank's "
            f"length, but the ring needs all S = {s_local * world} keys in global order "
            f"([..., S_local, S], got shape {tuple(attn_mask.shape)}). The mask was most "
            "likely built on local positions: a causal mask from the shard's length (pass "
            "is_causal=True instead: the ring applies it on global positions), or "
            "transformers' packed-sequence detection reading zigzag/striped position_ids "
            "as several sequences (use ring_attn.integrations.transformers)")
    _note_checkpoint(frame)
    lead = tuple(query.shape[:-3])
    q, k, v = (_flatten_batch(t, lead) for t in (query, key, value))
    mask = attn_mask
    if mask is not None and (query.dim() != 4 or mask.dim() > 4):
        mask = mask.expand(*lead, hq, q.shape[2], mask.shape[-1]).reshape(
            -1, hq, q.shape[2], mask.shape[-1])
    out = strategy_attention(q, k, v, strategy=frame.strategy, group=frame.group,
                             mesh=frame.mesh, layout=frame.layout, is_causal=bool(is_causal),
                             scale=scale, attn_mask=mask, dropout_p=float(dropout_p))
    return out.reshape(*lead, *out.shape[1:]) if query.dim() != 4 else out


class sequence_parallel:
    """Context manager: inside it, F.scaled_dot_product_attention is ring attention.

    Args:
      group: the process group whose ranks hold the sequence shards (None: the default).
      layout: how the sequence was sharded: "zigzag" (default), "contiguous" or "striped";
        must match the layout given to ring_attn.shard / ring_attn.positions.
      enabled: False turns the patch off inside the body (torch's function is restored
        there and the outer context's patch comes back on exit).
      strategy: "ring" (default), "ulysses" (all-to-all over heads within `group`;
        layout="contiguous") or "hybrid" (Ulysses inside each row of `mesh`, the ring
        across; pass mesh=, not group=). Positions: ring_attn.parallel.strategy.
        strategy_positions with the same arguments.
      mesh: for strategy="hybrid", a 2-D DeviceMesh with dims ("ulysses", "ring") or a
        (ulysses_group, ring_group) pair.

    Returns itself from __enter__. See the module docstring for what is and is not patched.
    """

    def __init__(self, group: Optional[Any] = None, layout: str = "zigzag",
                 enabled: bool = True, *, strategy: str = "ring",
                 mesh: Optional[Any] = None) -> None:
        if layout == "packed":
            raise ValueError("ring_attn.sequence_parallel: layout 'packed' needs cu_seqlens, "
                             "which F.scaled_dot_product_attention cannot carry; call "
                             "ring_attn.ring_attention(..., layout='packed', cu_seqlens=...)")
        try:
            check_strategy(strategy, group, mesh, layout)
        except ValueError as e:
            raise ValueError(str(e).replace("ring_attn:", "ring_attn.sequence_parallel:", 1))
        self.strategy = strategy
        self.mesh = mesh
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
                           previous=F.scaled_dot_product_attention, strategy=self.strategy,
                           mesh=self.mesh)
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
            restore = frame.previous
            if not _stack:
                # Checkpointed ring calls still to be recomputed keep the guard installed.
                inner = getattr(restore, "_ring_attn_inner", restore)
                if _pending:
                    _recompute_guard._ring_attn_inner = inner
                    restore = _recompute_guard
                else:
                    restore = inner
            F.scaled_dot_product_attention = restore
