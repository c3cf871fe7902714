"""The 2-D hybrid: Ulysses inside each row of a mesh, the ring across (USP, a2a+p2p).

A mesh of P = U x R ranks, dims named "ulysses" (size U) and "ring" (size R). Mesh rank
(u, r) holds, of a global sequence of S tokens:

    the ring shard of ring rank r in `layout` (S/R tokens, in the ring's local order),
    then its u-th contiguous piece of S/(R*U) tokens (hybrid_positions says which).

So the Ulysses all-to-all inside row r (concatenating the pieces in order u = 0 .. U-1)
rebuilds exactly the ring shard r, for Hq/U heads, and `ring_attention(layout=layout)`
runs across the rows on [B, Hq/U, S/R, D] unchanged: every layout, its causal balance,
the position-keyed masking. U = 1 is the pure ring and R = 1 pure Ulysses, neither with
any communication of the other kind.

Lengths: S must be a multiple of R * U (and S/R even for zigzag). Masks: key masks
[B|1, Hq|1, 1, S] in global key order, the same on every rank (ulysses.py says why);
with U = 1 every mask the ring takes. Dropout: U = 1 only (ulysses.py). Extra keyword
arguments (the ring's window / softcap / document options) go to ring_attention.

Bytes per rank, fwd + bwd: Ulysses' 2 x 4 (U-1)/U |shard| in the row (MHA; see ulysses.py)
on shards S/(R U) long, plus the ring's on [B, Hq/U, S/R, D]: the K/V of the ring shard,
1/U of the heads, sent R-1 times per pass (and the dK/dV accumulator in the backward).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..comm import GroupInfo, group_info
from ..errors import RingAttnError, RingAttnTypeError
from ..layout import Run, check_layout, local_runs, narrow_runs, runs_to_positions
from ..layout import shard as ring_shard
from ..layout import unshard as ring_unshard
from ..ring import ring_attention, ring_attention_of_heads
from .ulysses import Agreed, ulysses_around

Tensor = torch.Tensor
DIMS = ("ulysses", "ring")
Mesh = Union["torch.distributed.device_mesh.DeviceMesh", Sequence[Optional[dist.ProcessGroup]]]


def mesh_groups(mesh: Mesh) -> tuple[Optional[dist.ProcessGroup], Optional[dist.ProcessGroup]]:
    """(Ulysses group, ring group) of a 2-D DeviceMesh with dims named "ulysses" and
    "ring" (in either order), or of a pair (ulysses_group, ring_group)."""
    from torch.distributed.device_mesh import DeviceMesh
    if isinstance(mesh, DeviceMesh):
        names = tuple(mesh.mesh_dim_names or ())
        if mesh.ndim != 2 or sorted(names) != sorted(DIMS):
            raise RingAttnError(f"ring_attn: mesh must be a 2-D DeviceMesh with dims named "
                                f"{DIMS}, got {mesh.ndim}-D with names {names or None}")
        return mesh.get_group("ulysses"), mesh.get_group("ring")
    if isinstance(mesh, (tuple, list)) and len(mesh) == 2:
        return mesh[0], mesh[1]
    raise RingAttnTypeError(f"ring_attn: mesh must be a DeviceMesh with dims {DIMS} or a "
                            f"pair (ulysses_group, ring_group), got {type(mesh).__name__}")


# --- Who holds which tokens (pure, then over the mesh). --------------------------------------

def hybrid_local_runs(u: int, u_size: int, r: int, r_size: int, s_local: int,
                      layout: str) -> list[Run]:
    """Global positions of mesh rank (u, r)'s s_local tokens, as runs in local order: the
    u-th contiguous piece of ring rank r's shard of U * s_local tokens."""
    if not 0 <= u < u_size:
        raise ValueError(f"ring_attn: Ulysses rank {u} outside [0, {u_size})")
    return narrow_runs(local_runs(r, r_size, u_size * s_local, layout), u * s_local, s_local)


def _infos(mesh: Mesh) -> tuple[GroupInfo, GroupInfo]:
    ug, rg = mesh_groups(mesh)
    return group_info(ug), group_info(rg)


def hybrid_positions(s_local: int, *, mesh: Mesh, layout: str = "zigzag",
                     device: Optional[torch.device] = None) -> Tensor:
    """int64 global positions of this rank's s_local tokens (e.g. for rotary embeddings)."""
    row, col = _infos(mesh)
    return runs_to_positions(hybrid_local_runs(row.rank, row.world_size, col.rank,
                                               col.world_size, s_local, layout), device)


def hybrid_shard(x: Tensor, *, mesh: Mesh, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """This rank's shard of the full tensor x (identical on every rank) along dim: the ring
    shard (layout.shard over the ring group), then its contiguous Ulysses piece.
    Differentiable (layout.shard's gradient convention, twice)."""
    ug, rg = mesh_groups(mesh)
    row, col = group_info(ug), group_info(rg)
    check_layout(layout)
    m = hybrid_required_multiple(row.world_size, col.world_size, layout)
    if x.size(dim) % m != 0:
        w = m // 2 if layout == "zigzag" else m  # pad_for_ring pads to 2w for zigzag
        raise ValueError(f"ring_attn: the {layout!r} hybrid over a {row.world_size} x "
                         f"{col.world_size} (Ulysses x ring) mesh needs a sequence length "
                         f"that is a multiple of {m}, got {x.size(dim)}; pad it with "
                         f"ring_attn.pad_for_ring(x, world_size={w}, layout={layout!r}) and "
                         "mask the padded keys")
    piece = ring_shard(x, dim=dim, group=rg, layout=layout)
    return ring_shard(piece, dim=dim, group=ug, layout="contiguous")


def hybrid_unshard(x: Tensor, *, mesh: Mesh, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """The full tensor from every mesh rank's shard x, on every rank (the inverse of
    hybrid_shard; differentiable with layout.unshard's convention)."""
    ug, rg = mesh_groups(mesh)
    piece = ring_unshard(x, dim=dim, group=ug, layout="contiguous")
    return ring_unshard(piece, dim=dim, group=rg, layout=layout)


def hybrid_required_multiple(u_size: int, r_size: int, layout: str) -> int:
    """S must be a multiple of this: R * U, and R * lcm(U, 2) for zigzag (S/R even)."""
    return r_size * math.lcm(u_size, 2 if layout == "zigzag" else 1)


# --- The attention. -------------------------------------------------------------------------

def hybrid_attention(query: Tensor, key: Tensor, value: Tensor, *, mesh: Mesh,
                     layout: str = "zigzag", is_causal: bool = False,
                     attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
                     scale: Optional[float] = None, **ring_kwargs: Any) -> Tensor:
    """Exact attention over a sequence split across a U x R mesh: Ulysses all-to-all in
    each row, ring_attention across.

    Args:
      query, key, value: this rank's shards [B, Hq, S/(U R), D] (Hk K/V heads, Dv for
        value) in the hybrid layout (hybrid_shard / hybrid_positions). Hq % U == 0; Hk a
        multiple or a divisor of U (see ring_attn.parallel.ulysses).
      mesh: a 2-D DeviceMesh with dims named "ulysses" and "ring", or a pair
        (ulysses_group, ring_group).
      layout: the ring layout across the rows ("zigzag", "contiguous", "striped").
      attn_mask: a key mask [B|1, Hq|1, 1, S], global key order, the same on every rank
        (U = 1: any mask ring_attention takes).
      dropout_p: U = 1 only (the pure ring).
      ring_kwargs: passed to ring_attention.

    Returns this rank's shard [B, Hq, S/(U R), Dv] of the output, differentiable. Before
    any transfer every rank of the mesh agrees (one small all_gather in the row, one in
    the column; ring_attention then checks its column again).
    """
    ug, rg = mesh_groups(mesh)
    row, col = group_info(ug), group_info(rg)
    ring = dict(layout=layout, group=rg, **ring_kwargs)
    if row.world_size == 1:
        return ring_attention(query, key, value, is_causal=is_causal, scale=scale,
                              attn_mask=attn_mask, dropout_p=dropout_p, **ring)

    def across(q: Tensor, k: Tensor, v: Tensor, m: Optional[Tensor], a: Agreed
               ) -> tuple[Tensor, Tensor]:
        # The Ulysses step drew the dropout seed (torch's generator moves once, as on one
        # device); the ring keys its RNG with this rank's global head offset.
        return ring_attention_of_heads(q, k, v, is_causal=is_causal, scale=a.scale,
                                       attn_mask=m, dropout_p=a.dropout_p,
                                       dropout_seed=a.seed, head_offset=a.head_offset,
                                       return_lse=True, **ring)

    return ulysses_around(query, key, value, attn_mask, is_causal=is_causal, scale=scale,
                          dropout_p=dropout_p, layout=layout, row=row, col=col, inner=across)
