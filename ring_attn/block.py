"""One ring step: the kernel call on one (query block, K/V block) pair, and its merge.

The real ring (ring.py) and the in-process simulated ring (simulated.py) both drive these
two functions, so they share every per-step decision: which rows to narrow to (from the
schedule), the global positions given to the kernel (they key the band, the documents and
the dropout RNG, so a sharded run masks and drops exactly what one device would), the
visibility arguments (causal, window, GLOBAL cu_seqlens, given only to blocks the schedule
says need them; softcap to every block), the slice of the attention mask, and the merge:
out in the accumulation dtype (float32; float64 for float64 inputs), lse in float64 as the
kernels return it for every dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from . import ops
from .layout import Run, local_runs, narrow_runs, runs_to_positions
from .merge import merge_
from .schedule import BlockStep, RingPlan, ring_schedule
from .visibility import Visibility

Tensor = torch.Tensor


@dataclass(frozen=True)
class RingSpec:
    """Everything a rank needs to run its part of the ring; identical on every rank
    except `rank` (checked by validate.py before the first step)."""
    rank: int
    world_size: int
    layout: str
    is_causal: bool
    scale: float
    dropout_p: float
    seed: Optional[Tensor]      # int64 scalar, the same on every rank; None w/o dropout
    s_local: int
    kv_nonfinite: tuple[bool, ...] = ()  # per rank: its K/V shard may hold NaN/inf
    rows_nonfinite: tuple[bool, ...] = ()  # per rank: its query rows may meet NaN
    call: int = 0               # the ring call's number in its group (validate.py)
    window: Optional[tuple[int, int]] = None  # (left, right), -1 unbounded
    softcap: float = 0.0        # 0: off
    cu_seqlens: Optional[Tensor] = None       # global document boundaries, inputs' device
    docs: Optional[tuple[int, ...]] = None    # the same as ints (the schedule's copy)
    head_offset: int = 0        # global index of query head 0 in the dropout RNG key
    schedule: RingPlan = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", ring_schedule(
            self.rank, self.world_size, self.layout, self.s_local, self.visibility,
            self.kv_nonfinite, self.rows_nonfinite))

    @property
    def visibility(self) -> Visibility:
        return Visibility.of(self.is_causal, self.window, self.docs)

    def kernel_rule(self, band: bool) -> dict:
        """The visibility arguments of ops.attn_fwd/attn_bwd for a block: all of them when
        the schedule says some pair of the block may be hidden, none otherwise."""
        left, right = self.window if self.window is not None else (-1, -1)
        if not band:
            return dict(is_causal=False, softcap=self.softcap)
        return dict(is_causal=self.is_causal, window_left=left, window_right=right,
                    cu_seqlens_q=self.cu_seqlens, cu_seqlens_k=self.cu_seqlens,
                    softcap=self.softcap)

    def runs(self, rank: int) -> list[Run]:
        return local_runs(rank, self.world_size, self.s_local, self.layout, self.docs)


def _kernel_positions(runs: Sequence[Run], device: torch.device) -> tuple[Optional[Tensor], int]:
    """A single unit-step run is an offset (no position tensor); anything else a map."""
    if len(runs) == 1 and runs[0].step == 1:
        return None, runs[0].start
    return runs_to_positions(runs, device), 0


def slice_mask(mask: Optional[Tensor], q_start: int, q_len: int,
               k_runs: Sequence[Run]) -> Optional[Tensor]:
    """The block's part of this rank's [B|1, H|1, S_local|1, S] mask: a view when the
    block's keys form one run (contiguous, striped, zigzag off-diagonal), else a copy."""
    if mask is None:
        return None
    m = mask if mask.size(2) == 1 else mask.narrow(2, q_start, q_len)
    views = [m[..., r.start: r.start + r.step * (r.count - 1) + 1: r.step] for r in k_runs]
    return views[0] if len(views) == 1 else torch.cat(views, -1)


@dataclass
class _Block:
    q_pos: Optional[Tensor]
    q_off: int
    k_pos: Optional[Tensor]
    k_off: int
    mask: Optional[Tensor]


def _block_inputs(spec: RingSpec, blk: BlockStep, mask: Optional[Tensor],
                  device: torch.device) -> _Block:
    q_runs = narrow_runs(spec.runs(spec.rank), blk.q_start, blk.q_len)
    k_runs = narrow_runs(spec.runs(blk.source), blk.k_start, blk.k_len)
    q_pos, q_off = _kernel_positions(q_runs, device)
    k_pos, k_off = _kernel_positions(k_runs, device)
    return _Block(q_pos, q_off, k_pos, k_off, slice_mask(mask, blk.q_start, blk.q_len, k_runs))


def _rows(t: Tensor, start: int, length: int, dim: int = 2) -> Tensor:
    return t if start == 0 and length == t.size(dim) else t.narrow(dim, start, length)


Acc = tuple[Tensor, Tensor]  # (out [B, Hq, S_local, Dv], lse [B, Hq, S_local]), acc dtype


def forward_block(spec: RingSpec, blk: BlockStep, q: Tensor, k: Tensor, v: Tensor,
                  mask: Optional[Tensor], acc: Optional[Acc], k_base: int = 0
                  ) -> Optional[Acc]:
    """Attention of the block's queries over the block's keys, merged into acc. k and v
    hold rows k_base, k_base + 1, ... of the source's shard (a ring may send only the
    rows a window needs).

    acc None starts the accumulators from this block (the schedule's step 0 covers every
    query row). Returns the accumulators (updated in place when given)."""
    if blk.skip:
        return acc
    b = _block_inputs(spec, blk, mask, q.device)
    wide = q.dtype != torch.float64  # partials in float32; float64 stays float64
    ks = blk.k_start - k_base
    out, lse = ops.attn_fwd(
        _rows(q, blk.q_start, blk.q_len), _rows(k, ks, blk.k_len), _rows(v, ks, blk.k_len),
        b.mask, b.q_pos, b.k_pos, b.q_off, b.k_off, scale=spec.scale,
        dropout_p=spec.dropout_p, seed=spec.seed, out_fp32=wide,
        dropout_head_offset=spec.head_offset, **spec.kernel_rule(blk.band))
    if acc is None:
        if blk.q_len != q.size(2):
            raise AssertionError("ring_attn: the first block must cover every query row")
        return out, lse  # float64 lse from the kernel (merge.py)
    acc_out, acc_lse = acc
    merge_(_rows(acc_out, blk.q_start, blk.q_len), _rows(acc_lse, blk.q_start, blk.q_len),
           out, lse)
    return acc


@dataclass
class BlockGrads:
    """A block's float32 (float64 for float64 inputs) gradient partials and the rows
    they belong to."""
    blk: BlockStep
    dq: Tensor
    dk: Tensor
    dv: Tensor

    def add_to(self, dq_acc: Tensor, dk_acc: Tensor, dv_acc: Tensor, k_base: int = 0) -> None:
        """dq into this rank's dQ; dk/dv into the accumulators of the K/V shard held,
        which hold its rows k_base, k_base + 1, ..."""
        b = self.blk
        _rows(dq_acc, b.q_start, b.q_len).add_(self.dq)
        _rows(dk_acc, b.k_start - k_base, b.k_len).add_(self.dk)
        _rows(dv_acc, b.k_start - k_base, b.k_len).add_(self.dv)


def backward_block(spec: RingSpec, blk: BlockStep, dout: Tensor, q: Tensor, k: Tensor,
                   v: Tensor, out: Tensor, lse: Tensor,
                   mask: Optional[Tensor], k_base: int = 0) -> Optional[BlockGrads]:
    """The block's gradient partials (None for a skipped block); k, v as in forward_block.

    out and lse are this rank's GLOBAL attention output and log-sum-exp (over all keys),
    so each block's probabilities exp(score - lse) are already the final ones and the
    blocks' partials simply add up."""
    if blk.skip:
        return None
    b = _block_inputs(spec, blk, mask, q.device)
    qs, ql, ks, kl = blk.q_start, blk.q_len, blk.k_start - k_base, blk.k_len
    wide = q.dtype != torch.float64
    dq, dk, dv = ops.attn_bwd(
        _rows(dout, qs, ql), _rows(q, qs, ql), _rows(k, ks, kl), _rows(v, ks, kl),
        _rows(out, qs, ql), _rows(lse, qs, ql), None, b.mask, b.q_pos, b.k_pos, b.q_off,
        b.k_off, scale=spec.scale, dropout_p=spec.dropout_p, seed=spec.seed,
        grad_fp32=wide, dropout_head_offset=spec.head_offset, **spec.kernel_rule(blk.band))
    return BlockGrads(blk, dq, dk, dv)
