"""ring_attn.schedule as a pure function: every rank's blocks cover exactly the (query, key)
pairs attention needs, each once; a block computed without the causal mask holds no
masked pair; K/V shards pass rank to rank; zigzag and striped balance the work per step."""
from __future__ import annotations

import pytest

from ring_attn.layout import LAYOUTS, global_positions
from ring_attn.schedule import (plan_step, recv_peer, ring_plan, send_peer, source_rank)

WORLDS = [1, 2, 3, 4, 5, 8]


def _s_locals(layout: str) -> list[int]:
    return [2, 6] if layout == "zigzag" else [1, 5, 6]


def _block_pairs(rank: int, p: int, s_local: int, layout: str, causal: bool, step: int):
    """(qpos, kpos) pairs the block computes after its own causal mask, and whether every
    pair in the block's rectangle is needed (for blocks the kernel runs unmasked)."""
    blk = plan_step(rank, step, p, layout, causal, s_local)
    if blk.skip:
        return blk, set(), True
    qpos = global_positions(rank, p, s_local, layout)[blk.q_start:blk.q_start + blk.q_len]
    kpos = global_positions(blk.source, p, s_local, layout)[blk.k_start:blk.k_start + blk.k_len]
    rect = {(int(i), int(j)) for i in qpos for j in kpos}
    kept = {(i, j) for i, j in rect if not blk.band or j <= i}
    return blk, kept, all(j <= i for i, j in rect)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_blocks_cover_needed_pairs_once(layout: str, causal: bool) -> None:
    for p in WORLDS:
        for s_local in _s_locals(layout):
            for r in range(p):
                mine = [int(x) for x in global_positions(r, p, s_local, layout)]
                needed = {(i, j) for i in mine for j in range(p * s_local)
                          if not causal or j <= i}
                got: list[tuple[int, int]] = []
                for t in range(p):
                    blk, kept, all_below = _block_pairs(r, p, s_local, layout, causal, t)
                    assert blk.step == t and blk.rank == r
                    if causal and not blk.skip and not blk.band:
                        assert all_below, (f"{layout} P={p} r={r} t={t}: a block run without "
                                           "the causal mask holds a masked pair")
                    got += sorted(kept)
                assert len(got) == len(set(got)), "a pair computed twice"
                assert set(got) == needed, f"{layout} causal={causal} P={p} r={r}"


def test_kv_passes_to_next_rank() -> None:
    for p in WORLDS:
        for r in range(p):
            assert source_rank(r, 0, p) == r  # step 0: own shard, so accumulators start there
            assert send_peer(recv_peer(r, p), p) == r
            for t in range(p - 1):
                # What r holds at step t, r + 1 holds at step t + 1.
                assert source_rank(send_peer(r, p), t + 1, p) == source_rank(r, t, p)
            assert sorted(source_rank(r, t, p) for t in range(p)) == list(range(p))


def _work(layout: str, p: int, s_local: int, step: int) -> list[int]:
    return [len(_block_pairs(r, p, s_local, layout, True, step)[1]) for r in range(p)]


def test_zigzag_equal_work_per_step() -> None:
    for p in WORLDS:
        for s_local in (2, 6, 8):
            c = s_local // 2
            for t in range(p):
                work = _work("zigzag", p, s_local, t)
                assert len(set(work)) == 1, f"P={p} step {t}: {work}"
                assert work[0] == (2 * c * c + c if t == 0 else 2 * c * c)
                # Off-diagonal steps narrow to half the block: no kernel call on masked rows.
                for r in range(p):
                    blk = plan_step(r, t, p, "zigzag", True, s_local)
                    assert blk.q_len * blk.k_len == (s_local * s_local if t == 0 else 2 * c * c)


def test_striped_work_within_one_diagonal() -> None:
    for p in WORLDS:
        for s_local in (1, 5, 8):
            for t in range(p):
                work = _work("striped", p, s_local, t)
                assert max(work) - min(work) <= s_local, f"P={p} step {t}: {work}"


def test_contiguous_skips_blocks_above_diagonal() -> None:
    for p in WORLDS:
        for r in range(p):
            plan = ring_plan(r, p, "contiguous", True, 4)
            assert [b.skip for b in plan] == [t > r for t in range(p)]
            assert plan[0].band and not any(b.band for b in plan[1:])


def test_noncausal_blocks_are_whole() -> None:
    for layout in LAYOUTS:
        for p in WORLDS:
            for b in ring_plan(p - 1, p, layout, False, 4):
                assert (b.skip, b.band, b.q_start, b.q_len, b.k_start, b.k_len) == (
                    False, False, 0, 4, 0, 4)
