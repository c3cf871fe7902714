"""Cross-rank agreement, checked before the ring sends anything.

A ring whose ranks disagree (one rank causal, another not; a shard of another length; a
different dtype) would deadlock on mismatched message sizes or silently compute garbage.
So every rank first checks its own inputs, then all ranks all_gather one small int64
vector describing them (fixed length, so the collective itself cannot mismatch), and
every rank compares all of them. A rank whose own check failed reports it through the
same vector, so all ranks raise together, each naming the rank at fault: never a hang.
The same collective carries rank 0's dropout seed to everyone, each rank's "my K/V shard
may hold NaN/inf" flag and its "my query rows may be non-finite" flag (the schedule may
skip a block only if its K/V and its query rows are finite: a masked NaN key still makes
rows NaN in torch's math backend, whose masking is additive), and a per-group call
number.

The call number makes the backward agree too: each backward starts with one more small
all_gather of a vector of the same length (so it pairs safely even with a forward's),
carrying the call number, create_graph, dout's shape and dtype, and the rank's "dout or
out may be non-finite" flag (which, like the forward's, forces blocks to be computed). This
is not folded into the K/V messages: a header there would catch a swapped order only
between calls of equal message sizes (other sizes fail or hang inside the transport), and
could not refuse a double backward before K/V moves. Ranks that run the
backwards of two ring calls in different orders (or one rank a forward while another a
backward) would otherwise pair their K/V messages across calls and silently compute wrong
gradients; now every rank raises before any K/V moves.
"""
from __future__ import annotations

import hashlib
import math
import struct
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .comm import GroupInfo
from .documents import check_cu_seqlens
from .errors import (DOUBLE_BACKWARD, SATURATED, RingAttnError, RingAttnException,
                     RingAttnNotImplementedError)
from .functional import (_has_kernel, check_bool, check_dropout_p, check_mask_type,
                         check_scale, check_softcap, check_tensor, check_window, draw_seed)
from .layout import RING_LAYOUTS, check_layout, local_runs, resolve_layout
from .packing import check_packed_arguments
from .merge import acc_dtype

Tensor = torch.Tensor

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool]
_DEVICES = ["cpu", "cuda"]
# (name, how to show a value); the vector is
# [MAGIC, error flag, *fields, seed, K/V flag, query-rows flag].
_FIELDS = ["ring call number", "batch", "query heads", "key/value heads", "head dim",
           "value head dim", "query shard length", "key/value shard length", "dtype",
           "device type", "layout",
           "is_causal", "scale", "dropout_p", "attn_mask presence", "attn_mask dtype",
           "attn_mask key length", "window left", "window right", "softcap",
           "cu_seqlens length", "cu_seqlens (64-bit hash of its values)"]
_MAGIC = 0x52494E47  # "RING": tells our vector from garbage when debugging a hang
_MAGIC_BWD = 0x52494E42  # "RINB": the backward's vector (same length as the forward's)
_ROW = 2 + len(_FIELDS) + 3
# The backward's fields, at the same offsets (the rest of its vector is zeros).
_BWD_FIELDS = ["the ring call whose backward runs (every rank must run the backwards of its "
               "ring calls in the same order)", "create_graph", "dout dim 0", "dout dim 1",
               "dout dim 2", "dout dim 3", "dout dtype"]

# Ring calls so far, per process group: every rank of a group calls the ring in the same
# order, so the n-th call has number n on every rank. Keyed by the group object (None and
# the world group are the same group), weakly: a strong key kept the group alive past
# destroy_process_group, so its gloo threads were torn down during interpreter exit, which
# aborted ranks ("terminate called without an active exception") after their work was done.
_calls: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()


class _NoGroup:
    """The key of calls made with no process group (unit tests of the agreement)."""


_NO_GROUP = _NoGroup()


def _call_key(info: GroupInfo) -> object:
    if info.group is None and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return _NO_GROUP if info.group is None else info.group


def _next_call(info: GroupInfo) -> int:
    key = _call_key(info)
    _calls[key] = _calls.get(key, 0) + 1
    return _calls[key]


@dataclass(frozen=True)
class Agreed:
    scale: float
    dropout_p: float
    seed: Optional[Tensor]   # rank 0's dropout seed (int64 scalar, CPU); None w/o dropout
    mask: Optional[Tensor]   # attn_mask as 4-D [B|1, H|1, S_local|1, S]
    call: int                # this call's number in its group, the same on every rank
    kv_nonfinite: tuple[bool, ...]  # per rank: its K/V shard may hold NaN/inf
    rows_nonfinite: tuple[bool, ...]  # per rank: its queries (or float mask) may hold NaN/+inf
    window: Optional[tuple[int, int]]  # (left, right), -1 unbounded; None: no window
    softcap: float           # 0.0: off
    docs: Optional[tuple[int, ...]]  # the global cu_seqlens as ints
    layout: str              # the concrete layout ("auto" resolved)


class RingInputError(RingAttnError):
    """Raised on every rank when ranks disagree or one rank's inputs are invalid (a
    RuntimeError, as torch raises for the equivalent single-device inputs)."""


def _sum_nonfinite(*ts: Tensor) -> Tensor:
    """0-D bool tensor, True if any of ts may hold NaN/inf; one reduction each, no host
    sync. A NaN or inf anywhere makes the sum non-finite; a sum of huge finite values may
    overflow to inf too: a false positive, which only costs the skipped blocks' compute
    (masked finite keys contribute exactly 0)."""
    dt = acc_dtype(ts[0].dtype)
    total = ts[0].sum(dtype=dt)
    for t in ts[1:]:
        total = total + t.sum(dtype=dt)
    return torch.isfinite(total).logical_not()


def kv_nonfinite(k: Tensor, v: Tensor) -> Tensor:
    """0-D bool tensor on k's device, True if k or v may hold NaN/inf; no host sync."""
    return _sum_nonfinite(k, v)


def rows_nonfinite(q: Tensor, mask: Optional[Tensor] = None, *more: Tensor) -> Tensor:
    """0-D bool tensor, True if this rank's query rows may meet a NaN in a block the
    schedule would skip: q (or, in the backward, dout and out) holds NaN/inf, or a float
    mask holds NaN/+inf (-inf is plain masking). A +inf query against a masked key gives
    +inf + (-inf) = NaN in torch's math backend; a non-finite out or dout makes the
    backward's delta non-finite, and 0 * NaN reaches every key's gradient. No host sync."""
    bad = _sum_nonfinite(q, *more)
    if mask is not None and mask.dtype != torch.bool and mask.numel() > 0:
        # One pass: amax propagates NaN and is +inf iff an entry is +inf.
        bad = bad | (mask.amax() < float("inf")).logical_not()
    return bad


def _fingerprint(docs: Optional[tuple[int, ...]]) -> list[int]:
    """[length, 64-bit hash of the values] of cu_seqlens ([-2, 0] for None): what ranks
    compare to agree on the document boundaries without sending them."""
    if docs is None:
        return [-2, 0]
    h = hashlib.blake2b(struct.pack(f"<{len(docs)}q", *docs), digest_size=8).digest()
    return [len(docs), struct.unpack("<q", h)[0]]


def float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


def _show(name: str, value: int) -> str:
    if name.startswith("window"):
        return "-1 (unbounded)" if value == -1 else str(value)
    if value == -1:
        return "n/a"
    if name in ("dtype", "attn_mask dtype"):
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "?"
    if name == "cu_seqlens length" and value == -2:
        return "None"
    if name == "device type":
        return _DEVICES[value] if 0 <= value < len(_DEVICES) else "?"
    if name == "layout":
        return repr(RING_LAYOUTS[value]) if 0 <= value < len(RING_LAYOUTS) else "?"
    if name in ("is_causal", "attn_mask presence"):
        return str(bool(value))
    if name in ("scale", "dropout_p", "softcap"):
        return repr(bits_float(value))
    if name.startswith("cu_seqlens ("):
        return f"{value & (2**64 - 1):#018x}"
    return str(value)


def normalize_mask(mask: Tensor, q: Tensor, s_global: int) -> Tensor:
    """[..., S_local|1, S] broadcastable on batch and heads -> 4-D view."""
    if mask.dim() > 4 or mask.dim() < 2:
        raise RingAttnError(f"ring_attn: attn_mask must be 2-D to 4-D [..., S_local, S], "
                            f"got {mask.dim()}-D of shape {tuple(mask.shape)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    want = (q.size(0), q.size(1), q.size(2), s_global)
    names = ("batch", "heads", "queries (S_local)", "keys (S = world_size * S_local)")
    for i in range(4):
        if m.size(i) != want[i] and (m.size(i) != 1 or i == 3):
            raise RingAttnError(f"ring_attn: attn_mask shape {tuple(mask.shape)} does not "
                                f"broadcast to [B, Hq, S_local, S] = {list(want)}: dim {i} "
                                f"({names[i]}) is {m.size(i)}")
    return m


def _local_check(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *, is_causal: bool,
                 scale: Optional[float], dropout_p: float, layout: str,
                 info: GroupInfo) -> tuple[Optional[Tensor], float, float]:
    """Raise on inputs this rank alone can tell are wrong, with the exception types of
    ring_attn.scaled_dot_product_attention (torch's); return (4-D mask, scale, dropout_p).
    (window, softcap and cu_seqlens: check_window, check_softcap, check_cu_seqlens.)"""
    check_layout(layout)
    for name, t in (("query", q), ("key", k), ("value", v)):
        check_tensor(name, t)
    check_mask_type(mask)
    check_bool("is_causal", is_causal)
    dropout_p = check_dropout_p(dropout_p)
    scale = check_scale(scale)
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 4:
            raise RingAttnError(f"ring_attn: {name} must be 4-D [B, H, S_local, D], got "
                                f"{t.dim()}-D of shape {tuple(t.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in _DTYPES[:4]:
        raise RingAttnError("ring_attn: query, key, value need one floating dtype (float32, "
                            f"float64, float16, bfloat16), got {q.dtype}, {k.dtype}, "
                            f"{v.dtype}")
    if not q.device == k.device == v.device:
        raise RingAttnError(f"ring_attn: query, key, value must share a device, got "
                            f"{q.device}, {k.device}, {v.device}")
    if q.device.type not in _DEVICES or not _has_kernel(q.device):
        raise RingAttnNotImplementedError(f"ring_attn: no ring_attn kernel for device "
                                          f"{q.device}")
    if "nccl" in info.backend and "gloo" not in info.backend and q.device.type != "cuda":
        raise RingAttnError(f"ring_attn: the group's backend is {info.backend!r}, which needs "
                            f"CUDA tensors; the inputs are on {q.device}")
    if q.device.type == "cuda" and q.device.index != torch.cuda.current_device():
        raise RingAttnError(f"ring_attn: inputs are on {q.device} but the current CUDA "
                            f"device is cuda:{torch.cuda.current_device()}; call "
                            "torch.cuda.set_device(local_rank) before the ring")
    b, hq, s, d = q.shape
    if k.size(0) != b or v.size(0) != b:
        raise RingAttnError(f"ring_attn: batch sizes differ: query {b}, key {k.size(0)}, "
                            f"value {v.size(0)}")
    if k.size(1) != v.size(1) or k.size(1) == 0 or hq % k.size(1) != 0:
        raise RingAttnError(f"ring_attn: query heads ({hq}) must be a multiple of key/value "
                            f"heads (key {k.size(1)}, value {v.size(1)}, which must be "
                            "equal)")
    if k.size(3) != d:
        raise RingAttnError(f"ring_attn: key head dim must equal query's {d}, got "
                            f"{k.size(3)}")
    if k.size(2) != s or v.size(2) != s:
        raise RingAttnError("ring_attn: query, key and value shards must have the same "
                            f"length (self-attention over one sequence), got {s}, "
                            f"{k.size(2)}, {v.size(2)}")
    if layout == "zigzag" and s % 2 != 0:
        raise RingAttnError(f"ring_attn: a 'zigzag' shard holds two equal chunks, so its "
                            f"length must be even, got {s}; the global length must be a "
                            f"multiple of 2 * world_size = {2 * info.world_size} (see "
                            "ring_attn.pad_for_ring)")
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d > 0 else 1.0
    if mask is None:
        return None, scale, dropout_p
    check_mask_values(mask, q)
    return normalize_mask(mask, q, s * info.world_size), scale, dropout_p


def check_mask_values(mask: Tensor, q: Tensor) -> None:
    """What every distributed entry point asks of attn_mask besides its shape: bool or
    the query's dtype, on the query's device, no gradient."""
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise RingAttnError(f"ring_attn: attn_mask dtype must be bool or the query's "
                            f"{q.dtype}, got {mask.dtype}")
    if mask.device != q.device:
        raise RingAttnError(f"ring_attn: attn_mask must be on the query's device {q.device}, "
                            f"got {mask.device}")
    if mask.requires_grad:
        raise RingAttnError("ring_attn: gradients with respect to attn_mask are not "
                            "supported")


def _describe(call: int, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *,
              is_causal: bool, scale: float, dropout_p: float, layout: str,
              window: Optional[tuple[int, int]], softcap: float,
              docs: Optional[tuple[int, ...]]) -> list[int]:
    return [call, q.size(0), q.size(1), k.size(1), q.size(3), v.size(3), q.size(2), k.size(2),
            _DTYPES.index(q.dtype), _DEVICES.index(q.device.type), RING_LAYOUTS.index(layout),
            int(bool(is_causal)), float_bits(scale), float_bits(dropout_p), int(mask is not None),
            _DTYPES.index(mask.dtype) if mask is not None else -1,
            mask.size(-1) if mask is not None else -1,
            *(window if window is not None else (-1, -1)), float_bits(softcap), *_fingerprint(docs)]


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


def _gather(row: list[int], info: GroupInfo, flags: Optional[Tensor] = None
            ) -> list[list[int]]:
    """all_gather one fixed-length int64 row per rank (flags, a 1-D tensor on any device,
    fills the last slots without a host sync of its own); the .tolist() is the one host
    sync."""
    if info.world_size == 1 and flags is None:
        return [row]
    mine = torch.tensor(row, dtype=torch.int64, device=_wire_device(info))
    if flags is not None:
        mine[-flags.numel():].copy_(flags)
    if info.world_size == 1:
        return [mine.cpu().tolist()]
    gathered = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(gathered, mine, group=info.group)
    return torch.stack(gathered).cpu().tolist()


def _check_phase(rows: list[list[int]], magic: int, info: GroupInfo) -> None:
    """Every rank must be in the same phase (forward or backward of a ring call)."""
    other = [r for r, row in enumerate(rows) if row[0] != magic]
    if other:
        here, there = (("forward", "backward") if magic == _MAGIC else ("backward", "forward"))
        raise RingInputError(
            f"ring_attn: rank {info.rank} runs a ring {here} while rank(s) {other} run a "
            f"ring {there}: every rank must run its ring calls, and their backwards, in the "
            "same order")


def _check_equal(rows: list[list[int]], names: list[str], show) -> None:
    for i, name in enumerate(names):
        values = [row[2 + i] for row in rows]
        if any(x != values[0] for x in values):
            diff = ", ".join(f"rank {r} has {show(name, x)}"
                             for r, x in enumerate(values) if x != values[0])
            raise RingInputError(f"ring_attn: ranks disagree on {name}: rank 0 has "
                                 f"{show(name, values[0])}, {diff}")


def _raise_if_rejected(rows: list[list[int]], error: Optional[BaseException],
                       info: GroupInfo) -> None:
    """Every rank raises when any rank's own check failed (slot 1 of its row): the rank at
    fault with its own error's type, the others with RingInputError naming it."""
    bad = [r for r, row_r in enumerate(rows) if row_r[1] != 0]
    if not bad:
        return
    if error is not None:
        msg = f"ring_attn: rank {info.rank}: {error}"
        if isinstance(error, RuntimeError):
            raise RingInputError(msg) from error
        raise type(error)(msg) from error
    raise RingInputError(f"ring_attn: rank(s) {bad} rejected their inputs (see the error "
                         f"raised there); this rank ({info.rank}) stops too")


def agree_on_fields(magic: int, what: str, fields: list[int], names: list[str],
                    error: Optional[BaseException], info: GroupInfo,
                    per_rank: list[int] = (), show=None) -> list[list[int]]:
    """The agreement of agree_on_inputs for other entry points (ring_attn.inference): one
    all_gather of [magic, error flag, *fields, *per_rank], padded to the ring's vector
    length (so it pairs safely with a rank that is in a ring call instead, which then
    raises too). Raises on every rank when a rank is in another kind of call, rejected
    its inputs (error), or differs on one of `fields` (named by `names`); returns every
    rank's row, whose per_rank slots (after the fields) may differ."""
    row = [magic, int(error is not None), *fields, *per_rank]
    if len(row) > _ROW:
        raise AssertionError("ring_attn: agreement vector longer than the ring's")
    rows = _gather(row + [0] * (_ROW - len(row)), info)
    other = [r for r, row_r in enumerate(rows) if row_r[0] != magic]
    if other:
        raise RingInputError(f"ring_attn: rank {info.rank} runs {what} while rank(s) {other} "
                             "run another ring_attn call: every rank must make the same calls "
                             "in the same order")
    _raise_if_rejected(rows, error, info)
    _check_equal(rows, names, show or _show)
    return rows


def agree_on_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], *,
                    is_causal: bool, scale: Optional[float], dropout_p: float, layout: str,
                    info: GroupInfo, window: object = None, softcap: object = None,
                    cu_seqlens: object = None, seed: Optional[Tensor] = None) -> Agreed:
    """Check this rank's inputs and that every rank of the group agrees; raise on every
    rank otherwise (RingInputError, a RuntimeError; the rank at fault raises its own
    error's type). Returns the agreed scale, seed, mask, call number and K/V flags."""
    call = _next_call(info)  # advanced on every call, whatever happens, on every rank
    error: Optional[BaseException] = None
    mask4, flags, docs = None, None, None
    try:
        window = check_window(window)
        if layout == "auto":
            layout = resolve_layout(layout, window, info.world_size,
                                    q.size(2) * info.world_size if isinstance(q, Tensor) and
                                    q.dim() == 4 else 0, is_causal=is_causal is True)
        mask4, scale, dropout_p = _local_check(q, k, v, mask, is_causal=is_causal,
                                               scale=scale, dropout_p=dropout_p,
                                               layout=layout, info=info)
        softcap = check_softcap(softcap)
        if layout == "packed":
            # The packed layout pads every rank to its plan's s_local: the documents end
            # at their own token count T <= P * S_local, and the shard length must be the
            # plan's (local_runs raises naming both).
            check_packed_arguments(cu_seqlens, mask)
            docs = check_cu_seqlens(cu_seqlens, None, "cu_seqlens", q.device)
            local_runs(info.rank, info.world_size, q.size(2), layout, docs)
        elif cu_seqlens is not None:
            docs = check_cu_seqlens(cu_seqlens, q.size(2) * info.world_size, "cu_seqlens",
                                    q.device)
        fields = _describe(call, q, k, v, mask, is_causal=is_causal, scale=scale,
                           dropout_p=dropout_p, layout=layout, window=window,
                           softcap=softcap, docs=docs)
        flags = torch.stack([kv_nonfinite(k, v), rows_nonfinite(q, mask)])
    except (RingAttnException, TypeError, ValueError, IndexError, NotImplementedError) as e:
        # (ValueError: layout.py's checks of the layout and the shard length.)
        if info.world_size == 1:
            raise
        error, fields, dropout_p = e, [-1] * len(_FIELDS), 0.0
    # Every rank draws (keeping torch's generator in step across ranks); rank 0's is used.
    # seed: one a caller already agreed on (the hybrid's Ulysses step), not drawn again.
    if dropout_p > 0.0 and error is None:
        seed = int(seed) if seed is not None else int(draw_seed())
    else:
        seed = 0
    # One rank needs no flags: its step 0 (its own block) is never skipped.
    rows = _gather([_MAGIC, int(error is not None), *fields, seed, 0, 0], info,
                   flags if info.world_size > 1 else None)
    try:
        _check_phase(rows, _MAGIC, info)
    except RingInputError:
        # Only the ranks in a forward counted this call: un-count it, so the numbers stay
        # in step across ranks for the calls after this refused one.
        _calls[_call_key(info)] -= 1
        raise
    _raise_if_rejected(rows, error, info)
    _check_equal(rows, _FIELDS, _show)
    seed_t = torch.tensor(rows[0][-3], dtype=torch.int64) if dropout_p > 0.0 else None
    return Agreed(float(scale), dropout_p, seed_t, mask4, call,
                  tuple(bool(row[-2]) for row in rows), tuple(bool(row[-1]) for row in rows),
                  window, softcap, docs, layout)


def agree_on_backward(info: GroupInfo, call: int, dout: Tensor, create_graph: bool,
                      rows_flag: Tensor, saturated: Optional[Tensor] = None
                      ) -> tuple[bool, ...]:
    """Start of a ring backward: one small all_gather (a vector of the forward's length,
    so a rank still in a forward pairs with it safely) checks that every rank is in the
    backward of the same ring call, with dout of the same shape and dtype, and that none
    asks for a double backward. Raises on every rank otherwise, before any K/V moves.
    Cost: one all_gather of 27 int64 per backward (about 0.1 ms on gloo) and, on NCCL,
    the host sync of reading it back. rows_flag (0-D, rows_nonfinite of this rank's q,
    dout, out) rides in the last slot; returns every rank's, read with the same sync (a
    rank's non-finite rows make every rank send it the K/V it would otherwise skip).
    saturated (0-D, merge.saturated_rows of this rank's lse and dout) rides in the slot
    before it: any rank's makes every rank raise (the backward could not be exact)."""
    fields = [call, int(create_graph), *dout.shape, _DTYPES.index(dout.dtype)]
    row = [_MAGIC_BWD, int(create_graph), *fields]
    flags = torch.stack([torch.zeros((), dtype=torch.bool, device=rows_flag.device)
                         if saturated is None else saturated.to(rows_flag.device),
                         rows_flag.reshape(())])
    rows = _gather(row + [0] * (_ROW - len(row)), info, flags)
    _check_phase(rows, _MAGIC_BWD, info)
    if create_graph:
        raise RingAttnError(DOUBLE_BACKWARD)
    asked = [r for r, row_r in enumerate(rows) if row_r[1] != 0]
    if asked:
        raise RingAttnError(f"{DOUBLE_BACKWARD}: rank(s) {asked} asked for it "
                            f"(create_graph=True); this rank ({info.rank}) stops too")
    inexact = [r for r, row_r in enumerate(rows) if row_r[-2] != 0]
    if inexact:
        raise RingAttnError(f"{SATURATED} (rank(s) {inexact}; every rank stops)")

    def show(name: str, value: int) -> str:
        return _show("dtype", value) if name == "dout dtype" else str(value)
    _check_equal(rows, _BWD_FIELDS, show)
    return tuple(bool(row[-1]) for row in rows)
