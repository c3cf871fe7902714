"""One entry for the three sequence-parallel strategies, for callers that take the choice
as data (sequence_parallel(strategy=..., mesh=...), the planner):

    strategy   process groups          shards (token placement)       positions helper
    "ring"     group (P ranks)         `layout` over P                ring_attn.positions
    "ulysses"  group (U ranks)         contiguous over U              ring_attn.positions(
                                                                        layout="contiguous")
    "hybrid"   mesh (U x R, dims       `layout` over R, then a        hybrid_positions
               "ulysses" and "ring")   contiguous 1/U of each shard

`check_strategy` validates the choice once (e.g. when a context is entered);
`strategy_attention` runs one call with ring_attention's keyword arguments.

Which to choose (closed forms, per rank and forward pass; D = Dv, e bytes per element,
g = Hq / Hk, |kv| = this rank's K + V shard = 2 B Hk S_local D e):
  ring     sends (P-1) |kv| (backward: again, plus P float32 dK/dV accumulators),
           overlapped with compute: hidden when a step's transfer |kv| / BW is below its
           causal (zigzag) block compute 2 B Hq S_local^2 D / F: S_local >= e F / (g BW).
  ulysses  sends (U-1)/U (g + 1) |kv| (Hk < U: (U-1) (g/U + 1/Hk) |kv|), the same in the
           backward, NOT overlapped (all-to-all before and after the kernel). Fewer bytes
           than the ring (U = P) iff P > g + 1: MHA from P = 3, g = 4 from P = 6; g = 8
           never within U <= Hk (no replication). Needs Hq % U == 0.
  hybrid   Ulysses over the fast links (U <= Hk), the ring over the slow ones on shards U
           times longer (S/R), so the ring hides at S/R >= e F / (g BW_slow): U times
           shorter sequences than a pure ring across the slow links.
Example (assumed, not measured here: F = 400 TFLOP/s bf16 attention, e = 2): NVLink 450
GB/s hides the ring at S_local >= 1.8k / g tokens, 50 GB/s InfiniBand at >= 16k / g.
Measured (benchmarks/results/hybrid.md, CPU gloo, P = 4, 8 heads, S = 8192, fwd + bwd):
ring 80 MiB sent per rank, Ulysses 24, hybrid 2x2 48; with Hk = 2 (< U, replicated)
20 / 18 / 18 MiB. CPU time per rank equal within 12% (0.70-0.80 s).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from ..comm import group_info
from ..layout import check_layout
from ..ring import ring_attention
from .hybrid import Mesh, hybrid_attention, hybrid_positions, mesh_groups
from .ulysses import ulysses_attention

Tensor = torch.Tensor
STRATEGIES = ("ring", "ulysses", "hybrid")


def check_strategy(strategy: str, group: Optional[dist.ProcessGroup], mesh: Optional[Mesh],
                   layout: str) -> None:
    """Raise ValueError naming the argument when the combination cannot work."""
    if strategy not in STRATEGIES:
        raise ValueError(f"ring_attn: strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_layout(layout)
    if strategy == "hybrid":
        if mesh is None:
            raise ValueError("ring_attn: strategy='hybrid' needs mesh= (a 2-D DeviceMesh with "
                             "dims 'ulysses' and 'ring', or a (ulysses_group, ring_group) pair)")
        if group is not None:
            raise ValueError("ring_attn: strategy='hybrid' takes mesh=, not group=")
        mesh_groups(mesh)
        return
    if mesh is not None:
        raise ValueError(f"ring_attn: mesh= is for strategy='hybrid', got strategy={strategy!r}")
    if strategy == "ulysses" and layout != "contiguous":
        raise ValueError("ring_attn: strategy='ulysses' holds contiguous shards: pass "
                         f"layout='contiguous' (and shard with it), got layout={layout!r}")


def world_size(strategy: str, group: Optional[dist.ProcessGroup],
               mesh: Optional[Mesh]) -> int:
    """How many ranks share the sequence (S = world_size * S_local)."""
    if strategy == "hybrid":
        ug, rg = mesh_groups(mesh)
        return group_info(ug).world_size * group_info(rg).world_size
    return group_info(group).world_size


def strategy_positions(s_local: int, *, strategy: str, group: Optional[dist.ProcessGroup] = None,
                       mesh: Optional[Mesh] = None, layout: str = "zigzag",
                       device: Optional[torch.device] = None) -> Tensor:
    """int64 global positions of this rank's s_local tokens under the strategy."""
    from ..layout import positions
    check_strategy(strategy, group, mesh, layout)
    if strategy == "hybrid":
        return hybrid_positions(s_local, mesh=mesh, layout=layout, device=device)
    return positions(s_local, group=group, layout=layout, device=device)


def strategy_attention(query: Tensor, key: Tensor, value: Tensor, *, strategy: str = "ring",
                       group: Optional[dist.ProcessGroup] = None, mesh: Optional[Mesh] = None,
                       layout: str = "zigzag", is_causal: bool = False,
                       scale: Optional[float] = None, attn_mask: Optional[Tensor] = None,
                       dropout_p: float = 0.0, **ring_kwargs: Any) -> Tensor:
    """ring_attention / ulysses_attention / hybrid_attention on this rank's shards
    [B, H, S_local, D]; ring_kwargs (window, softcap, documents) go to the ring (refused
    by "ulysses", which has no ring)."""
    check_strategy(strategy, group, mesh, layout)
    common = dict(is_causal=is_causal, scale=scale, attn_mask=attn_mask, dropout_p=dropout_p)
    if strategy == "ring":
        return ring_attention(query, key, value, group=group, layout=layout, **common,
                              **ring_kwargs)
    if strategy == "hybrid":
        return hybrid_attention(query, key, value, mesh=mesh, layout=layout, **common,
                                **ring_kwargs)
    if ring_kwargs:
        raise TypeError(f"ring_attn: strategy='ulysses' does not take {sorted(ring_kwargs)} "
                        "(use strategy='hybrid' with a ring dim of size 1)")
    return ulysses_attention(query, key, value, group=group, **common)
