"""The pass-KV ring schedule: which block each rank computes at each step.

At step t (0 <= t < P) rank r holds the K/V shard of rank s = (r - t) mod P: every rank
starts with its own, sends what it holds to r + 1 and receives from r - 1. Rank r's
queries meet every K/V shard once. Without a causal mask every (query shard, K/V shard)
block is computed whole; with one, the schedule keeps only what lies on or below the
diagonal, so no kernel call touches a block that is all masked:

  contiguous  s < r: whole block, no mask (all keys precede all queries)
              s == r: whole block, causal; s > r: skipped (no kernel call)
              -> rank r works r + 1 steps: rank P-1 does P times rank 0's work.
  zigzag      shards hold chunks (r, 2P-1-r), c = S_local / 2 tokens each.
              s == r: whole block, causal (two triangles and one square: 2c^2 + c pairs)
              s < r:  all queries x the FIRST K/V chunk (chunk s precedes both query
                      chunks; chunk 2P-1-s follows both): 2c^2 pairs, no mask
              s > r:  the SECOND query chunk x all K/V (chunk 2P-1-r follows both K/V
                      chunks; chunk r precedes both): 2c^2 pairs, no mask
              -> every rank does the same work at every step (narrowed views, no copy).
  striped     whole block, causal by global position: key s + jP <= query r + iP keeps
              j <= i (s <= r) or j < i (s > r), a triangle of S_local(S_local +- 1)/2
              pairs at every step for every rank.

A block is skipped, or narrowed to its unmasked part, only when the K/V shard it reads is
finite: torch's math backend masks additively, so a NaN or inf in a masked (even a future)
key or value still reaches the output (NaN score + -inf = NaN; 0 * NaN = NaN). When the
source's shard may hold NaN/inf (`source_nonfinite`, agreed across ranks in validate.py),
or when this rank's query rows may meet a NaN there (`rows_nonfinite`: a NaN/inf in q, or
in the backward in dout or out, or a NaN/+inf float mask), the block is computed whole with
the causal mask on global positions, as the diagonal is.

Everything here is pure (rank, step, world size, layout, causal, S_local) -> plan, tested
without a process group in tests/test_schedule.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from .layout import check_layout, check_local_length


@dataclass(frozen=True)
class BlockStep:
    """What rank computes at one step: local query rows [q_start, q_start + q_len) against
    rows [k_start, k_start + k_len) of the K/V shard it holds (that of rank `source`)."""
    step: int
    rank: int
    source: int
    skip: bool      # all masked: no kernel call at all
    q_start: int
    q_len: int
    k_start: int
    k_len: int
    causal: bool    # the kernel applies kpos <= qpos (False when the block is all below it)


def send_peer(rank: int, world_size: int) -> int:
    return (rank + 1) % world_size


def recv_peer(rank: int, world_size: int) -> int:
    return (rank - 1) % world_size


def source_rank(rank: int, step: int, world_size: int) -> int:
    """Whose K/V shard rank holds at step."""
    return (rank - step) % world_size


def plan_step(rank: int, step: int, world_size: int, layout: str, is_causal: bool,
              s_local: int, source_nonfinite: bool = False) -> BlockStep:
    check_layout(layout)
    check_local_length(s_local, layout)
    if not 0 <= step < world_size:
        raise ValueError(f"ring_attn: step {step} outside [0, {world_size})")
    s = source_rank(rank, step, world_size)
    whole = BlockStep(step, rank, s, False, 0, s_local, 0, s_local, False)
    if not is_causal:
        return whole
    diagonal = BlockStep(step, rank, s, False, 0, s_local, 0, s_local, True)
    if s == rank or layout == "striped" or source_nonfinite:
        return diagonal
    if layout == "contiguous":
        if s < rank:
            return whole
        return BlockStep(step, rank, s, True, 0, 0, 0, 0, False)
    c = s_local // 2
    if s < rank:
        return BlockStep(step, rank, s, False, 0, s_local, 0, c, False)
    return BlockStep(step, rank, s, False, c, c, 0, s_local, False)


def ring_plan(rank: int, world_size: int, layout: str, is_causal: bool, s_local: int,
              kv_nonfinite: tuple[bool, ...] = (),
              rows_nonfinite: bool = False) -> list[BlockStep]:
    """rank's blocks for steps 0 .. P-1. Step 0 is always the whole local block, so the
    forward can start its accumulators from it. kv_nonfinite[s]: rank s's K/V shard may
    hold NaN/inf (empty: all finite); rows_nonfinite: rank's own query rows may."""
    def nonfinite(t: int) -> bool:
        return rows_nonfinite or (bool(kv_nonfinite) and
                                  kv_nonfinite[source_rank(rank, t, world_size)])
    return [plan_step(rank, t, world_size, layout, is_causal, s_local, nonfinite(t))
            for t in range(world_size)]
