"""How a sequence is split across the P ranks of a ring, and the way back.

Three layouts, named by what rank r holds of a global sequence of S tokens:

  contiguous  chunk r of P equal chunks: tokens [r*S/P, (r+1)*S/P).
  zigzag      chunks r and 2P-1-r of 2P equal chunks, in that order. Under a causal
              mask every rank then owns one "early" and one "late" chunk, so every rank
              does the same work at every ring step (see schedule.py).
  striped     tokens r, r+P, r+2P, ... Causal work is balanced too: each block is a
              triangle of the same size, give or take its diagonal.

Every layout gives each rank S/P tokens (zigzag needs S divisible by 2P), so a rank's
shard is described by a few arithmetic runs of global positions, `Run(start, step,
count)`. A fourth layout, "packed" (packing.py), splits packed documents (cu_seqlens)
zigzag-wise per document and pads every rank to one length; it is expressed as Runs too,
so everything that takes runs drives it, and the functions below take its cu_seqlens.
The pure functions take (rank, world_size) explicitly; `shard`, `unshard` and
`positions` at the end read them from a process group (shard and unshard differentiable).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from .comm import group_info

Tensor = torch.Tensor
LAYOUTS = ("contiguous", "zigzag", "striped")
# Every layout the ring runs: the three above split any length that is a multiple of P
# (2P for zigzag); "packed" (packing.py) follows documents given by cu_seqlens.
RING_LAYOUTS = LAYOUTS + ("packed",)


class Run(NamedTuple):
    """Global positions start, start + step, ..., start + (count - 1) * step."""
    start: int
    step: int
    count: int


def check_layout(layout: str) -> None:
    if layout not in RING_LAYOUTS:
        raise ValueError(f"ring_attn: layout must be one of "
                         f"{', '.join(map(repr, RING_LAYOUTS))}, got {layout!r}")


def resolve_layout(layout: str, window: Optional[tuple[int, int]], world_size: int,
                   seq_len: int, *, is_causal: bool = False) -> str:
    """The concrete layout for `layout`: itself unless "auto". "auto" picks "contiguous"
    when a window lets K/V travel fewer hops than the full ring there, else "zigzag".

    Why: zigzag and striped balance plain causal work across ranks, but they scatter
    neighbouring tokens. Striped interleaves every rank's tokens with every other's, so
    a window skips no block and K/V still visit every rank (P - 1 hops). Zigzag holds two
    chunks of S_local / 2 whose neighbours live on ranks r - 1 and r + 1, so a causal
    window of `left` needs ceil(2 left / S_local) hops in EACH direction. Contiguous
    keeps S_local neighbours together: ceil(left / S_local) hops forward only (plus
    ceil(right / S_local) backward for a two-sided window), i.e. half zigzag's messages
    and bytes or fewer, and its windowed work is balanced too: every query sees at most
    left + 1 keys wherever it lives (only rank 0's first `left` queries see fewer).

    Pure, so the caller shards with the same result: call it once and pass what it
    returns to ring_attn.shard, positions and ring_attention alike."""
    if layout != "auto":
        check_layout(layout)
        return layout
    if window is None or world_size < 2 or seq_len < world_size:
        return "zigzag"
    s_local = seq_len // world_size
    left, right = window
    right = 0 if is_causal else right

    def hops(bound: int) -> int:
        return world_size - 1 if bound < 0 else min(world_size - 1, -(-bound // s_local))
    return "contiguous" if hops(left) + hops(right) < world_size - 1 else "zigzag"


def required_multiple(world_size: int, layout: str) -> int:
    """The global sequence length must be a multiple of this (P, or 2P for zigzag)."""
    check_layout(layout)
    if layout == "packed":
        raise ValueError("ring_attn: the 'packed' layout takes any length (it pads each "
                         "rank internally); its shard length is packing.packed_plan's s_local")
    return 2 * world_size if layout == "zigzag" else world_size


def check_global_length(seq_len: int, world_size: int, layout: str) -> None:
    """Raise, naming the required multiple, when `layout` cannot split `seq_len` tokens."""
    m = required_multiple(world_size, layout)
    if seq_len % m != 0:
        why = "2 * world_size" if layout == "zigzag" else "world_size"
        raise ValueError(
            f"ring_attn: the {layout!r} layout over {world_size} ranks needs a sequence length "
            f"that is a multiple of {m} ({why}), got {seq_len}; pad it with "
            f"ring_attn.pad_for_ring (to {-(-seq_len // m) * m}) and mask the padded keys")


def check_local_length(s_local: int, layout: str) -> None:
    """A shard of the zigzag layout is two equal chunks, so its length must be even.
    (A 'packed' shard's length is checked against its plan where its runs are built.)"""
    check_layout(layout)
    if layout == "zigzag" and s_local % 2 != 0:
        raise ValueError("ring_attn: a 'zigzag' shard holds two equal chunks, so its length "
                         f"must be even, got {s_local}")


def _packing():
    # packing.py builds on Run and runs_to_positions from this module, so it is imported
    # where the "packed" layout is used rather than at the top (a circular import).
    from . import packing
    return packing


def local_runs(rank: int, world_size: int, s_local: int, layout: str,
               cu_seqlens=None) -> list[Run]:
    """The global positions of rank's s_local tokens, as runs in local order.
    cu_seqlens (a tensor or a validated tuple): the documents, for layout="packed" only."""
    if layout == "packed":
        return _packing().packed_runs(rank, world_size, s_local, cu_seqlens)
    check_local_length(s_local, layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"ring_attn: rank {rank} outside [0, {world_size})")
    if layout == "contiguous":
        return [Run(rank * s_local, 1, s_local)]
    if layout == "zigzag":
        c = s_local // 2
        return [Run(rank * c, 1, c), Run((2 * world_size - 1 - rank) * c, 1, c)]
    return [Run(rank, world_size, s_local)]


def narrow_runs(runs: Sequence[Run], start: int, length: int) -> list[Run]:
    """The runs of local tokens [start, start + length)."""
    out: list[Run] = []
    offset = 0
    for r in runs:
        lo, hi = max(start, offset), min(start + length, offset + r.count)
        if lo < hi:
            out.append(Run(r.start + (lo - offset) * r.step, r.step, hi - lo))
        offset += r.count
    return out


def runs_to_positions(runs: Sequence[Run], device: Optional[torch.device] = None) -> Tensor:
    parts = [torch.arange(r.start, r.start + r.step * r.count, r.step, dtype=torch.int64,
                          device=device)[: r.count] for r in runs]
    if not parts:
        return torch.empty(0, dtype=torch.int64, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def global_positions(rank: int, world_size: int, s_local: int, layout: str,
                     device: Optional[torch.device] = None, cu_seqlens=None) -> Tensor:
    """int64 global positions of the s_local tokens rank holds, in local order (for
    "packed", padding rows have positions >= the token count: in no document)."""
    return runs_to_positions(local_runs(rank, world_size, s_local, layout, cu_seqlens), device)


def shard_tensor(x: Tensor, rank: int, world_size: int, layout: str, dim: int = 2,
                 cu_seqlens=None) -> Tensor:
    """Rank's shard of the full tensor x along dim (a view where the layout allows)."""
    if layout == "packed":
        return _packing().shard_packed(x, rank, world_size, cu_seqlens, dim)
    dim = dim % x.dim()
    check_global_length(x.size(dim), world_size, layout)
    s_local = x.size(dim) // world_size
    if layout == "striped":
        # [.., S, ..] -> [.., S/P, P, ..] and pick column rank: token rank + P*i.
        return x.unflatten(dim, (s_local, world_size)).select(dim + 1, rank)
    runs = local_runs(rank, world_size, s_local, layout)
    parts = [x.narrow(dim, r.start, r.count) for r in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard_tensors(shards: Sequence[Tensor], layout: str, dim: int = 2,
                    cu_seqlens=None) -> Tensor:
    """The full tensor from every rank's shard (shards[r] from rank r), along dim."""
    if layout == "packed":
        return _packing().unshard_packed(shards, cu_seqlens, dim)
    check_layout(layout)
    world_size = len(shards)
    dim = dim % shards[0].dim()
    if layout == "contiguous":
        return torch.cat(list(shards), dim)
    if layout == "striped":
        return torch.stack(list(shards), dim + 1).flatten(dim, dim + 1)
    c = shards[0].size(dim) // 2
    check_local_length(shards[0].size(dim), layout)
    # Global chunk i < P is the first half of rank i; chunk i >= P the second half of
    # rank 2P-1-i.
    chunks = [shards[i].narrow(dim, 0, c) if i < world_size
              else shards[2 * world_size - 1 - i].narrow(dim, c, c)
              for i in range(2 * world_size)]
    return torch.cat(chunks, dim)


class RingPadding(NamedTuple):
    """What pad_for_ring returns.

    tensor:   the input padded at the end of `dim` to a length the layout can split.
    key_mask: bool [S_padded], True for real tokens, False for padding.
    valid_len: the original length; `out.narrow(dim, 0, valid_len)` drops the padding.
    """
    tensor: Tensor
    key_mask: Tensor
    valid_len: int


def pad_for_ring(x: Tensor, *, dim: int = 2, world_size: int, layout: str = "zigzag",
                 value: float = 0.0) -> RingPadding:
    """Pad the FULL sequence x at the end of dim to the next length `layout` can split
    over world_size ranks (a multiple of world_size, or 2 * world_size for zigzag).

    Padding is appended at the end, so:
      * causal attention needs no mask at all: a padded key's position is after every
        real query's, so the causal mask already hides it from every real query;
      * non-causal attention must hide the padded keys: pass
        `attn_mask=key_mask.view(1, 1, 1, -1)` to `scaled_dot_product_attention`, or to
        `ring_attention` (a [1, 1, 1, S] mask broadcasts over batch, heads and queries,
        and each rank passes the same one);
      * the padded queries' outputs are meaningless: after unsharding, keep
        `out.narrow(dim, 0, valid_len)` (and give them zero gradient, which narrowing does).
    Shard the padded tensor with `ring_attn.shard` (or pass it to `sequence_parallel`).
    """
    dim = dim % x.dim()
    s = x.size(dim)
    m = required_multiple(world_size, layout)
    padded_len = -(-s // m) * m
    key_mask = torch.arange(padded_len, device=x.device) < s
    if padded_len == s:
        return RingPadding(x, key_mask, s)
    pad_shape = list(x.shape)
    pad_shape[dim] = padded_len - s
    pad = x.new_full(pad_shape, value)
    return RingPadding(torch.cat([x, pad], dim), key_mask, s)


# --- The same over a process group: differentiable shard / unshard, positions. ---------
#
# Gradient convention. `shard` takes a FULL tensor that every rank holds identically
# (e.g. the embeddings of the same batch) and keeps this rank's shard; `unshard` all-gathers
# the shards into the full tensor on every rank. The losses of the ranks are taken to be
# ONE loss computed redundantly:
#   * shard's backward all-gathers the shard gradients into the full gradient (each full
#     position is owned by exactly one rank, so nothing is summed twice);
#   * unshard's backward keeps this rank's slice of the full gradient, which is exact
#     when every rank computes the same loss from the unsharded tensor (the usual case:
#     identical inputs, identical code). If ranks compute DIFFERENT losses from it, sum
#     their gradients first (all_reduce the full gradient) - this function does not.
# shard then unshard is the identity, and so is its backward (slice then gather).


def _all_gather(x: Tensor, group) -> list[Tensor]:
    info = group_info(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x, group=group)
    return parts


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group, layout: str, cu) -> Tensor:
        info = group_info(group)
        ctx.dim, ctx.group, ctx.layout, ctx.cu = dim, group, layout, cu
        return shard_tensor(x, info.rank, info.world_size, layout, dim, cu).contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        full = unshard_tensors(_all_gather(grad, ctx.group), ctx.layout, ctx.dim, ctx.cu)
        return full, None, None, None, None


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group, layout: str, cu) -> Tensor:
        info = group_info(group)
        ctx.dim, ctx.layout, ctx.rank, ctx.world = dim, layout, info.rank, info.world_size
        ctx.cu = cu
        return unshard_tensors(_all_gather(x, group), layout, dim, cu)

    @staticmethod
    def backward(ctx, grad: Tensor):
        mine = shard_tensor(grad, ctx.rank, ctx.world, ctx.layout, ctx.dim, ctx.cu)
        return mine.contiguous(), None, None, None, None


def _packed_cu(layout: str, cu_seqlens, total: Optional[int]):
    """The validated tuple of cu_seqlens for layout="packed" (None for other layouts,
    which refuse a cu_seqlens)."""
    if layout != "packed":
        if cu_seqlens is not None:
            raise ValueError(f"ring_attn: cu_seqlens is for layout='packed', got layout "
                             f"{layout!r}")
        return None
    if cu_seqlens is None:
        raise ValueError("ring_attn: layout='packed' needs cu_seqlens (the document "
                         "boundaries of the full packed sequence)")
    from .documents import check_cu_seqlens
    return check_cu_seqlens(cu_seqlens, total, "cu_seqlens")


def shard(x: Tensor, *, dim: int = 2, group=None, layout: str = "zigzag",
          cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """This rank's shard of the full tensor x (identical on every rank) along dim.

    The length of dim must be a multiple of world_size (2 * world_size for zigzag);
    otherwise a ValueError names the multiple (see pad_for_ring). layout="packed" takes
    any length: cu_seqlens (the documents of the full sequence, ending at its length)
    decides the split and the shard is padded to the common S_local (packing.py).
    Differentiable: the backward all-gathers the gradient (see the convention above), so
    every rank must run it."""
    cu = _packed_cu(layout, cu_seqlens, x.size(dim))
    if cu is None:
        check_global_length(x.size(dim), group_info(group).world_size, layout)
    return _Shard.apply(x, dim % x.dim(), group, layout, cu)


def unshard(x: Tensor, *, dim: int = 2, group=None, layout: str = "zigzag",
            cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """The full tensor from every rank's shard x (same shape on every rank), all-gathered.
    For layout="packed" (with the cu_seqlens given to shard), padding rows are dropped.

    Differentiable: the backward keeps this rank's slice of the gradient, exact when
    every rank computes the same loss from the full tensor (see the convention above)."""
    cu = _packed_cu(layout, cu_seqlens, None)
    if cu is None:
        check_layout(layout)
    return _Unshard.apply(x, dim % x.dim(), group, layout, cu)


def positions(s_local: int, *, group=None, layout: str = "zigzag",
              device: Optional[torch.device] = None,
              cu_seqlens: Optional[Tensor] = None) -> Tensor:
    """int64 positions of this rank's s_local tokens for rotary embeddings: global ones,
    or, for layout="packed", positions within each token's document (restarting at 0;
    padding rows 0). The kernels' global positions of a packed shard are
    packing.packed_global_positions."""
    info = group_info(group)
    cu = _packed_cu(layout, cu_seqlens, None)
    if cu is not None:
        _packing().packed_runs(info.rank, info.world_size, s_local, cu)  # checks s_local
        return _packing().packed_document_positions(info.rank, info.world_size, cu, device)
    return global_positions(info.rank, info.world_size, s_local, layout, device)
