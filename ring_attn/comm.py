"""Ring communication: the exchanges the schedule asks for, posted without waiting.

Each step of the ring posts one batch of point-to-point messages with
`torch.distributed.batch_isend_irecv` and returns at once; the caller computes on the
buffer it holds and calls `wait()` afterwards, so the transfer overlaps the compute (the
receive lands in a fresh buffer, swapped in after the wait). Who sends which rows to whom
is decided by the pure schedule (schedule.py): every message a rank posts at step i is
matched by the peer's message at the same step i, so the batches pair up on NCCL (which
matches by issue order) as on gloo (which matches by peer and tag).

On NCCL, ProcessGroupNCCL orders the transfer after the work already queued on the
current stream and `wait()` makes the current stream wait for it, so no host sync is
needed. On gloo (CPU) the transfer runs on gloo's own threads.

`record_traffic()` counts what this process actually sends (tests assert the hop counts
and bytes of the windowed ring with it; benchmarks report bytes per rank).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist

Tensor = torch.Tensor

# Distinct tags keep the K/V stream and the dK/dV stream of the backward ring apart on
# gloo, which matches messages by (peer, tag); NCCL matches by issue order, which both
# sides share.
KV_TAG = 7301
DKV_TAG = 7302
HOME_TAG = 7303


@dataclass
class Traffic:
    """Messages sent by this process while recording: (group peer, tag, bytes) each."""
    sent: list = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(n for _, _, n in self.sent)

    def count(self, tag: Optional[int] = None) -> int:
        return sum(1 for _, t, _ in self.sent if tag is None or t == tag)


_recorders: list[Traffic] = []


@contextlib.contextmanager
def record_traffic() -> Iterator[Traffic]:
    """Count every message RingComm sends inside the block."""
    t = Traffic()
    _recorders.append(t)
    try:
        yield t
    finally:
        _recorders.remove(t)


@dataclass(frozen=True)
class GroupInfo:
    group: Optional[dist.ProcessGroup]
    rank: int          # rank within the group
    world_size: int
    backend: str


def group_info(group: Optional[dist.ProcessGroup]) -> GroupInfo:
    """Rank, size and backend of group (None: the default group), with a clear error when
    torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "ring_attn: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (or use "
            "ring_attn.scaled_dot_product_attention on one device)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError("ring_attn: this process is not a member of the given group")
    return GroupInfo(group, rank, dist.get_world_size(group), str(dist.get_backend(group)))


class Pending:
    """An exchange in flight; wait() blocks (or orders the stream) until it is done."""

    def __init__(self, works: list) -> None:
        self._works = works
        self.keep: list = []  # the sent tensors, alive until the wait

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []


class RingComm:
    """Post the schedule's messages between ranks of the group."""

    def __init__(self, info: GroupInfo) -> None:
        self.info = info

    def _global(self, group_rank: int) -> int:
        if self.info.group is None:
            return group_rank
        return dist.get_global_rank(self.info.group, group_rank)

    def exchange(self, sends: Sequence[tuple[int, Tensor]],
                 recvs: Sequence[tuple[int, Tensor]], tag: int) -> Pending:
        """Post sends [(group peer, tensor)] and recvs into the given tensors; return
        without waiting."""
        ops = [dist.P2POp(dist.isend, t, self._global(peer), self.info.group, tag)
               for peer, t in sends]
        ops += [dist.P2POp(dist.irecv, t, self._global(peer), self.info.group, tag)
                for peer, t in recvs]
        for rec in _recorders:
            rec.sent += [(peer, tag, t.numel() * t.element_size()) for peer, t in sends]
        return Pending(dist.batch_isend_irecv(ops) if ops else [])


def all_gather(buf: Tensor, info: GroupInfo, tag: int) -> list[Tensor]:
    """dist.all_gather of one buffer per rank (the same size on every rank), recorded as
    this rank's buffer sent to each of the P - 1 others under `tag` (what a ring or
    direct all-gather sends per rank)."""
    parts = [torch.empty_like(buf) for _ in range(info.world_size)]
    for rec in _recorders:
        rec.sent += [(peer, tag, buf.numel() * buf.element_size())
                     for peer in range(info.world_size) if peer != info.rank]
    dist.all_gather(parts, buf, group=info.group)
    return parts


def pack(tensors: list[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    """One contiguous 1-D buffer holding tensors back to back (one message per step)."""
    dtype = dtype or tensors[0].dtype
    buf = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device)
    for view, t in zip(unpack(buf, [t.shape for t in tensors]), tensors):
        view.copy_(t)
    return buf


def unpack(buf: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    """Contiguous views of buf with the given shapes, back to back."""
    views, offset = [], 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        views.append(buf.narrow(0, offset, n).view(shape))
        offset += n
    return views


def _rows_shape(shape: torch.Size, rows: int) -> torch.Size:
    return torch.Size((shape[0], shape[1], rows) + tuple(shape[3:]))


class HeldKV:
    """The K/V rows a rank holds at each step of its schedule (schedule.Step), and the
    exchange, posted before the step's compute, that brings the next step's rows."""

    def __init__(self, comm: Optional[RingComm], k: Tensor, v: Tensor) -> None:
        self.comm, self.own = comm, (k, v)
        self.kv: tuple = (k, v)
        self._buf: Optional[Tensor] = None   # kv packed, when it arrived packed
        self._next: Optional[tuple[Tensor, int]] = None

    def _rows(self, step, rows) -> Tensor:
        """rows (schedule.Rows) of the own shard or of the held one, packed."""
        own = rows.source == step.blk.rank
        (k, v), start = (self.own, 0) if own else (self.kv, step.held.start)
        if not own and self._buf is not None and rows.start == start and \
                rows.count == k.size(2):
            return self._buf
        a = rows.start - start
        return pack([k.narrow(2, a, rows.count), v.narrow(2, a, rows.count)])

    def post(self, step) -> Pending:
        send, recv = step.kv_send, step.kv_recv
        sends = [(send.peer, self._rows(step, send.rows))] if send is not None else []
        self._next = None
        recvs = []
        if recv is not None:
            k, v = self.own
            n = (k.numel() + v.numel()) // k.size(2) * recv.rows.count
            self._next = (torch.empty(n, dtype=k.dtype, device=k.device), recv.rows.count)
            recvs = [(recv.peer, self._next[0])]
        if not sends and not recvs:
            return Pending([])
        pending = self.comm.exchange(sends, recvs, KV_TAG)
        pending.keep = sends
        return pending

    def advance(self, pending: Pending) -> None:
        """After the step's compute: wait for the exchange, hold what it brought."""
        pending.wait()
        if self._next is None:
            self.kv, self._buf = (None, None), None
            return
        self._buf, rows = self._next
        k, v = self.own
        self.kv = tuple(unpack(self._buf, [_rows_shape(k.shape, rows),
                                           _rows_shape(v.shape, rows)]))


class GradTransit:
    """The backward's dK/dV (accumulation dtype): the sums of this rank's own shard, and
    the accumulators of other shards travelling with their K/V along the schedule until
    the last rank of each journey sends it home (schedule.py)."""

    def __init__(self, comm: Optional[RingComm], k: Tensor, v: Tensor,
                 dtype: torch.dtype) -> None:
        self.comm, self.shapes = comm, (k.shape, v.shape)
        self.per_row = (k.numel() + v.numel()) // max(k.size(2), 1)
        # The own shard's (dk, dv) sums: own() or a hop-0 take() sets them (ring.py
        # computes the own block last, so they are not live during the ring steps).
        self.home: Optional[tuple[Tensor, Tensor]] = None
        self._dtype, self._device = dtype, k.device
        self._cur: Optional[Tensor] = None
        self._next: Optional[Tensor] = None
        self._last = Pending([])                 # the previous step's dK/dV exchange
        self._ended: dict[int, Tensor] = {}      # source -> accumulator to send home
        self._homing: list[Pending] = []         # the home exchanges in flight
        self._arriving: list = []                # (buffer, rows) of own sums coming home

    def _views(self, buf: Tensor, rows: int) -> list[Tensor]:
        return unpack(buf, [_rows_shape(s, rows) for s in self.shapes])

    def take(self, step) -> tuple[Optional[Tensor], Optional[Tensor], int]:
        """(dk, dv, first row) where the step's partials add up: the own sums at hop 0,
        else the held shard's accumulator (arrived from the previous rank, or new)."""
        if step.hop == 0:
            if self.home is None:
                self.home = tuple(self._views(torch.zeros(
                    self.per_row * self.shapes[0][2], dtype=self._dtype,
                    device=self._device), self.shapes[0][2]))
            return (*self.home, 0)
        if step.acc is None:  # nothing of the shard arrived: nothing to add
            self._cur = None
            return None, None, 0
        if step.acc_in is not None:
            self._last.wait()
            self._cur = self._next
        else:
            self._cur = torch.zeros(self.per_row * step.acc.count, dtype=self._dtype,
                                    device=self._device)
        return (*self._views(self._cur, step.acc.count), step.acc.start)

    def own(self, dk: Tensor, dv: Tensor) -> None:
        """The own block's whole-shard dk, dv partials (accumulation dtype) are the own
        sums: finish() adds what comes home to them."""
        self.home = (dk, dv)

    def pass_on(self, step, nxt) -> None:
        """After the step: its accumulator goes on to the next rank (or waits here to go
        home); the next step's arrives; at the end of a stream accumulators go home."""
        self._last.wait()
        if step.acc is not None and step.acc_out is None:
            self._ended[step.blk.source] = self._cur
        sends = [(step.acc_out.peer, self._cur)] if step.acc_out is not None else []
        recvs = []
        if nxt is not None and nxt.acc_in is not None:
            self._next = torch.empty(self.per_row * nxt.acc.count, dtype=self._dtype,
                                     device=self._device)
            recvs = [(nxt.acc_in.peer, self._next)]
        self._last = self.comm.exchange(sends, recvs, DKV_TAG) if sends or recvs else \
            Pending([])
        self._last.keep = sends
        if step.home_send or step.home_recv is not None:
            sends = [(m.peer, self._ended.pop(m.rows.source)) for m in step.home_send]
            recvs = []
            if step.home_recv is not None:
                buf = torch.empty(self.per_row * step.home_recv.rows.count,
                                  dtype=self._dtype, device=self._device)
                recvs = [(step.home_recv.peer, buf)]
                self._arriving.append((buf, step.home_recv.rows))
            self._homing.append(self.comm.exchange(sends, recvs, HOME_TAG))
            self._homing[-1].keep = sends

    def finish(self) -> tuple[Tensor, Tensor]:
        """Wait for everything in flight; the own shard's dk, dv sums (what came home
        added to the own block's, or to zeros when neither own() nor take() set them)."""
        self._last.wait()
        dk, dv = self.home if self.home is not None else self._views(torch.zeros(
            self.per_row * self.shapes[0][2], dtype=self._dtype, device=self._device),
            self.shapes[0][2])
        for pending in self._homing:
            pending.wait()
        for buf, rows in self._arriving:
            for own, got in zip((dk, dv), self._views(buf, rows.count)):
                own.narrow(2, rows.start, rows.count).add_(got)
        return dk, dv
