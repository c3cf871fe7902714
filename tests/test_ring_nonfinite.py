"""NaN and inf through the ring exactly as torch's math backend on the full sequence: a
NaN in a key that is causally in the future of every query (held by another rank) still
makes those rows NaN, a non-finite V[j, c] makes column c NaN everywhere, a NaN query row
stays in its row; out and gradients, for the simulated ring (P = 2 and 4, every layout)
and gloo (P = 2); tests/test_properties.py draws more (P = 1..4, shapes, masks). The
schedule must compute, not skip, the blocks of a non-finite K/V shard or of non-finite
query rows (schedule.py), and the kernels must propagate like math (kernels-nan)."""
from __future__ import annotations

import pytest
import torch

import ring_attn
from dist_utils import assert_all_ok, run_ranks
from helpers import assert_close_to_ref, sdpa_reference
from ring_attn.layout import LAYOUTS, global_positions
from ring_attn.schedule import ring_plan
from ring_attn.simulated import simulated_ring_attention

NAN, INF = float("nan"), float("inf")

# name -> (tensor, index into [B, H, S, D] as a function of S, value); S = P * S_local.
CASES = {
    "nan_last_key": ("k", lambda s: (0, 1, s - 1, 3), NAN),     # future of all but one row
    "nan_value_last_key": ("v", lambda s: (0, 0, s - 1, 2), NAN),  # column 2 everywhere
    "inf_value_first_key": ("v", lambda s: (0, 1, 0, 1), INF),
    "neg_inf_key_middle": ("k", lambda s: (0, 0, s // 2, 0), -INF),
    "inf_key_last": ("k", lambda s: (0, 0, s - 1, 5), INF),
    "nan_query_row": ("q", lambda s: (0, 1, 1, 4), NAN),
}


def _inputs(case: str, s: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(11)
    t = {n: torch.randn(1, 2, s, 8, generator=g, dtype=torch.float64) for n in "qkv"}
    dout = torch.randn(1, 2, s, 8, generator=g, dtype=torch.float64)
    name, index, value = CASES[case]
    t[name][index(s)] = value
    return [t[n].to(dtype) for n in "qkv"], dout.to(dtype)


def _reference(xs, dout, causal: bool, mask=None):
    """float64 math on the full sequence: (out, dq, dk, dv)."""
    x64 = [x.double().requires_grad_() for x in xs]
    ref = sdpa_reference(*x64, attn_mask=mask, is_causal=causal)
    return [ref, *torch.autograd.grad(ref, x64, dout.double())]


def _compare(got, want, what: str) -> list[str]:
    """NaN and +-inf exactly where the reference has them, finite values close."""
    failures = []
    for name, ours, ref in zip(("out", "dq", "dk", "dv"), got, want):
        ours, ref = ours.detach(), ref.detach()
        for kind in ("isnan", "isposinf", "isneginf"):
            a, b = getattr(ours, kind)(), getattr(ref, kind)()
            if not torch.equal(a, b):
                failures.append(f"{what} {name}: {kind} differs at {int((a != b).sum())} "
                                f"of {a.numel()} entries (ours {int(a.sum())}, math "
                                f"{int(b.sum())})")
        if not failures:
            try:
                assert_close_to_ref(ours, None, ref, atol_floor=5e-6, what=f"{what} {name}")
            except AssertionError as e:
                failures.append(str(e))
    return failures


def test_schedule_computes_blocks_of_nonfinite_shards() -> None:
    """Pure: a causal block that would be skipped or narrowed is computed whole, with the
    causal mask, when its source shard may hold NaN/inf; other blocks are unchanged."""
    for layout in LAYOUTS:
        for p in (2, 3, 4):
            for bad in range(p):
                flags = tuple(r == bad for r in range(p))
                for rank in range(p):
                    clean = ring_plan(rank, p, layout, True, 4)
                    plan = ring_plan(rank, p, layout, True, 4, flags)
                    for a, b in zip(clean, plan):
                        if a.source != bad:
                            assert a == b
                        else:
                            assert (b.skip, b.q_start, b.q_len, b.k_start, b.k_len,
                                    b.band) == (False, 0, 4, 0, 4, True), (layout, b)
                # Non-finite query rows: every block of the rank whole, causal.
                for rank in range(p):
                    for b in ring_plan(rank, p, layout, True, 4, rows_nonfinite=True):
                        assert (b.skip, b.q_start, b.q_len, b.k_start, b.k_len,
                                b.band) == (False, 0, 4, 0, 4, True), (layout, b)


def _check_simulated(device: str) -> None:
    failures = []
    for layout in LAYOUTS:
        for p in (2, 4):  # P = 3 and others: tests/test_properties.py draws them
            for causal in (True, False):
                for case in CASES:
                    xs, dout = _inputs(case, 4 * p)
                    want = _reference(xs, dout, causal)
                    xs = [x.to(device).requires_grad_() for x in xs]
                    out = simulated_ring_attention(*xs, world_size=p, layout=layout,
                                                   is_causal=causal)
                    got = [out, *torch.autograd.grad(out, xs, dout.to(device))]
                    failures += _compare([x.cpu() for x in got], want,
                                         f"simulated P={p} {layout} causal={causal} {case}")
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failures)"


def test_nonfinite_simulated_ring_matches_math_cpu() -> None:
    _check_simulated("cpu")


@pytest.mark.cuda
def test_nonfinite_simulated_ring_matches_math_cuda() -> None:
    _check_simulated("cuda")


def gloo_checks(rank: int, world_size: int) -> list[str]:
    failures = []
    s_local = 4
    s = world_size * s_local
    for layout in LAYOUTS:
        for causal in (True, False):
            for case in CASES:
                xs, dout = _inputs(case, s)
                want = _reference(xs, dout, causal)
                pos = global_positions(rank, world_size, s_local, layout)
                local = [x.index_select(2, pos).requires_grad_() for x in xs]
                out = ring_attn.ring_attention(*local, is_causal=causal, layout=layout)
                got = [out, *torch.autograd.grad(out, local, dout.index_select(2, pos))]
                failures += _compare(got, [w.index_select(2, pos) for w in want],
                                     f"gloo P={world_size} rank {rank} {layout} "
                                     f"causal={causal} {case}")
    return failures


def test_nonfinite_gloo_ring_matches_math(tmp_path) -> None:
    results = assert_all_ok(run_ranks(gloo_checks, 2, tmp_path, pg_timeout_s=30,
                                      join_timeout_s=120))
    failures = [f for per_rank in results for f in per_rank]
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failures)"
