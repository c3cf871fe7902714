"""Ring communication: who sends to whom, and one non-blocking exchange.

Each step of the ring sends one contiguous buffer to rank + 1 and receives one of the same
size from rank - 1 (ranks within the group). `RingComm.exchange` posts both with
`torch.distributed.batch_isend_irecv` and returns at once; the caller computes on the
buffer it holds and calls `wait()` afterwards, so the transfer overlaps the compute
(double buffering: the receive lands in a second buffer, swapped in after the wait).

On NCCL, ProcessGroupNCCL orders the transfer after the work already queued on the
current stream and `wait()` makes the current stream wait for it, so no host sync is
needed. On gloo (CPU) the transfer runs on gloo's own threads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

Tensor = torch.Tensor

# Distinct tags keep the K/V stream and the dK/dV stream of the backward ring apart on
# gloo, which matches messages by (peer, tag); NCCL matches by issue order, which both
# sides share.
KV_TAG = 7301
DKV_TAG = 7302


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

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []


class RingComm:
    """Send to the next rank of the ring, receive from the previous one."""

    def __init__(self, info: GroupInfo) -> None:
        self.info = info
        p, r = info.world_size, info.rank
        self.send_to = self._global((r + 1) % p)
        self.recv_from = self._global((r - 1) % p)

    def _global(self, group_rank: int) -> int:
        if self.info.group is None:
            return group_rank
        return dist.get_global_rank(self.info.group, group_rank)

    def exchange(self, send: Tensor, recv: Tensor, tag: int) -> Pending:
        """Post send -> rank + 1 and recv <- rank - 1; return without waiting."""
        ops = [dist.P2POp(dist.isend, send, self.send_to, self.info.group, tag),
               dist.P2POp(dist.irecv, recv, self.recv_from, self.info.group, tag)]
        return Pending(dist.batch_isend_irecv(ops))


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
