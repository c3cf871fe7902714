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


# --- Windows and documents: the same rule as the kernels, hops and messages -------------

import math  # noqa: E402
import random  # noqa: E402

from ring_attn.layout import resolve_layout  # noqa: E402
from ring_attn.schedule import ring_schedule  # noqa: E402
from ring_attn.visibility import Visibility  # noqa: E402


def random_cu(total: int, rng: random.Random) -> tuple[int, ...]:
    """Random document boundaries over total tokens, with empty and 1-token documents."""
    cu = [0]
    while cu[-1] < total:
        cu.append(min(total, cu[-1] + rng.choice([0, 1, 1, 2, 3, 5, 8, 13])))
    return tuple(cu)


def _visibilities(s: int, rng: random.Random) -> list[Visibility]:
    out = []
    for causal in (False, True):
        for window in (None, (0, 0), (1, 0), (2, 3), (5, -1), (-1, 4), (s, s), (3, 0)):
            for docs in (None, random_cu(s, rng)):
                out.append(Visibility.of(causal, window, docs))
    return out


def _check_plans(p: int, s_local: int, layout: str, vis: Visibility) -> None:
    """Every visible pair computed exactly once; a block run without the rule holds only
    visible pairs; every block reads rows the rank holds; every message pairs with the
    peer's at the same step, and holds rows the sender has."""
    plans = [ring_schedule(r, p, layout, s_local, vis) for r in range(p)]
    n = len(plans[0].steps)
    assert all(len(pl.steps) == n for pl in plans)
    assert n == 1 + sum(plans[0].hops) and sum(plans[0].hops) <= p - 1
    pos = [[int(x) for x in global_positions(r, p, s_local, layout)] for r in range(p)]
    what = f"{layout} P={p} S_local={s_local} {vis}"
    for r, pl in enumerate(plans):
        got = []
        for i, st in enumerate(pl.steps):
            b = st.blk
            assert b.step == i and b.rank == r
            if i == 0:
                assert (b.source, b.skip, b.q_start, b.q_len) == (r, False, 0, s_local)
            if b.skip:
                continue
            assert st.held.source == b.source and st.held.start <= b.k_start and \
                b.k_start + b.k_len <= st.held.start + st.held.count, what
            qs = pos[r][b.q_start:b.q_start + b.q_len]
            ks = pos[b.source][b.k_start:b.k_start + b.k_len]
            pairs = [(i_, j) for i_ in qs for j in ks if vis.visible(i_, j)]
            if not b.band:
                assert len(pairs) == len(qs) * len(ks), f"{what}: unmasked block hides pairs"
            got += pairs
        want = [(i_, j) for i_ in pos[r] for j in range(p * s_local) if vis.visible(i_, j)]
        assert len(got) == len(set(got)), f"{what} r={r}: a pair computed twice"
        assert set(got) == set(want), f"{what} r={r}: pairs missed"
    for i in range(n):
        for r, pl in enumerate(plans):
            st = pl.steps[i]
            for send_name, recv_name in (("kv_send", "kv_recv"), ("acc_out", None)):
                m = getattr(st, send_name)
                if m is None:
                    continue
                if send_name == "kv_send":
                    peer = plans[m.peer].steps[i]
                    assert peer.kv_recv is not None and peer.kv_recv.peer == r and \
                        peer.kv_recv.rows == m.rows, f"{what} step {i} r={r}"
                    assert plans[m.peer].steps[i + 1].held == m.rows
                    held = st.held if m.rows.source != r else None
                    if held is not None:
                        assert held.start <= m.rows.start and \
                            m.rows.start + m.rows.count <= held.start + held.count
                else:
                    nxt = plans[m.peer].steps[i + 1]
                    assert nxt.acc_in is not None and nxt.acc_in.peer == r and \
                        nxt.acc == st.acc == m.rows
            if st.kv_recv is not None:
                src = plans[st.kv_recv.peer].steps[i].kv_send
                assert src is not None and src.peer == r
            if st.acc_in is not None:
                prev = plans[st.acc_in.peer].steps[i - 1]
                assert prev.acc_out is not None and prev.acc_out.peer == r
    _check_grad_journeys(plans, what)


def _check_grad_journeys(plans, what: str) -> None:
    """Follow the dK/dV accumulators through the plan symbolically: every (rank, step)
    partial of a hop > 0 reaches its shard's owner exactly once."""
    arrived = {r: [] for r in range(len(plans))}
    for r, pl in enumerate(plans):
        for i, st in enumerate(pl.steps):
            if st.hop == 0 or st.blk.skip:
                continue
            # Walk the accumulator holding this partial until it is sent home.
            rank, step = r, i
            while plans[rank].steps[step].acc_out is not None:
                rank, step = plans[rank].steps[step].acc_out.peer, step + 1
            # It waits at `rank` for the end of its stream, then goes home.
            end = next(j for j in range(step, len(plans[rank].steps))
                       if plans[rank].steps[j].home_send or j == len(plans[rank].steps) - 1
                       or plans[rank].steps[j + 1].hop == 1)
            homes = [m for m in plans[rank].steps[end].home_send
                     if m.rows.source == st.blk.source]
            assert len(homes) == 1, f"{what}: partial of r={r} step {i} never goes home"
            owner = homes[0].peer
            assert owner == st.blk.source
            back = plans[owner].steps[end].home_recv
            assert back is not None and back.peer == rank and back.rows == homes[0].rows
            arrived[owner].append((r, i))
    for owner, got in arrived.items():
        assert len(got) == len(set(got)), f"{what}: a partial added twice"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_window_and_document_blocks_follow_the_rule(layout: str) -> None:
    rng = random.Random(11)
    for p in (1, 2, 3, 4, 5):
        for s_local in _s_locals(layout):
            for vis in _visibilities(p * s_local, rng):
                _check_plans(p, s_local, layout, vis)


def test_contiguous_window_hops() -> None:
    """K/V travel ceil(left / S_local) hops forward (causal), plus ceil(right / S_local)
    backward for two-sided windows, instead of P - 1; the nearest rank sends only the
    last `left` rows."""
    for p in (2, 3, 4, 8):
        for s_local in (4, 8):
            for left in (0, 1, 3, 4, 5, 9, 100):
                vis = Visibility.of(True, (left, 0), None)
                want = min(p - 1, math.ceil(left / s_local))
                for r in range(p):
                    pl = ring_schedule(r, p, "contiguous", s_local, vis)
                    assert pl.hops == (want, 0), (p, s_local, left, pl.hops)
                    if want and r + 1 < p:
                        assert pl.steps[0].kv_send.rows.count == min(s_local, left)
                    if r == p - 1:
                        assert all(st.kv_send is None for st in pl.steps)  # no wrap-around
                for right in (1, 4, 6):
                    vis2 = Visibility.of(False, (left, right), None)
                    h = (min(p - 1, math.ceil(left / s_local)),
                         min(p - 1, math.ceil(right / s_local)))
                    got = ring_schedule(0, p, "contiguous", s_local, vis2).hops
                    if sum(h) < p - 1:
                        assert got == h, (p, s_local, left, right, got)
                    else:
                        assert sum(got) == p - 1


def test_resolve_layout() -> None:
    assert resolve_layout("zigzag", (4, 0), 4, 64) == "zigzag"
    assert resolve_layout("auto", None, 4, 64) == "zigzag"
    assert resolve_layout("auto", (16, 0), 4, 64) == "contiguous"   # 1 hop of 3
    assert resolve_layout("auto", (16, -1), 4, 64, is_causal=True) == "contiguous"
    assert resolve_layout("auto", (16, -1), 4, 64) == "zigzag"       # unbounded right
    assert resolve_layout("auto", (40, 0), 4, 64) == "zigzag"        # 3 hops: no saving
    assert resolve_layout("auto", (8, 8), 4, 64) == "contiguous"     # 1 + 1 of 3
    with pytest.raises(ValueError, match="layout"):
        resolve_layout("diagonal", None, 4, 64)
