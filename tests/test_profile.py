"""The profiler: span recording, bubble arithmetic, the merged Chrome trace, both modes.

The ring driver's hook calls are not in ring.py yet (another helper owns it this
session); a fake driver loop with the same calls stands in, and the end-to-end test
enables itself once ring.py calls the recorder.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import time

import pytest

import ring_attn.ring
from ring_attn.profile import bubble, chrome_trace, flush, merge, profile, recorder, span

from dist_utils import assert_all_ok, run_ranks

# The module itself: once ring_attn/__init__ exports the `profile` class, the attribute
# ring_attn.profile (and `import ring_attn.profile as P`) is the class.
P = importlib.import_module("ring_attn.profile")


def _fake_ring(rec, phase: str, world: int, compute_s: float, wait_s: float) -> None:
    """The ring loop's shape (ring.py): compute the held block, then wait for the next."""
    for step in range(world):
        with span(rec, phase, step, "compute"):
            time.sleep(compute_s)
        if step + 1 < world:
            with span(rec, phase, step, "wait"):
                time.sleep(wait_s)


def test_span_off_costs_under_a_microsecond_or_two():
    assert recorder() is None
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(20000):
            with span(None, "fwd", i, "compute"):
                pass
        best = min(best, (time.perf_counter() - t0) / 20000)
    # a ring step on CPU takes >= ~1 ms (bench_ring: 0.07 s fwd at S=4096): < 0.2% of it
    assert best < 2e-6, best


def test_bubble_and_merge_by_hand(tmp_path):
    # rank 0: fwd compute 10 ms, wait 2, compute 8 -> pass 20 ms, bubble 10%;
    #         bwd compute 30, wait 10, compute 20 -> pass 60, bubble 16.67%
    # rank 1: fwd compute 5, wait 7, compute 8 -> 35%
    r0 = {"rank": 0, "world": 2, "clock": "barrier", "wall_origin": 100.0, "spans": [
        ["fwd", 0, "compute", 0.000, 0.010, 0], ["fwd", 0, "wait", 0.010, 0.012, 0],
        ["fwd", 1, "compute", 0.012, 0.020, 0],
        ["bwd", 0, "compute", 0.100, 0.130, 0], ["bwd", 0, "wait", 0.130, 0.140, 0],
        ["bwd", 1, "compute", 0.140, 0.160, 0]]}
    r1 = {"rank": 1, "world": 2, "clock": "barrier", "wall_origin": 100.5, "spans": [
        ["fwd", 0, "compute", 0.000, 0.005, 0], ["fwd", 0, "wait", 0.005, 0.012, 0],
        ["fwd", 1, "compute", 0.012, 0.020, 0]]}
    assert bubble(r0) == pytest.approx({"fwd": 10.0, "bwd": 100 / 6})
    assert bubble(r1) == pytest.approx({"fwd": 35.0})
    paths = []
    for r in (r1, r0):
        paths.append(str(tmp_path / f"t.json.rank{r['rank']}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    res = merge(paths, str(tmp_path / "t.json"), png=True, verbose=False)
    assert res["bubble"][1] == pytest.approx({"fwd": 35.0})
    trace = json.load(open(tmp_path / "t.json"))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == 9 and {e["tid"] for e in xs} == {0, 1}
    wait1 = next(e for e in xs if e["tid"] == 1 and e["cat"] == "wait")
    assert wait1["ts"] == pytest.approx(5000) and wait1["dur"] == pytest.approx(7000)
    # wall-clock records (env mode) are shifted by their origins: rank 1 started 0.5 s later
    shifted = chrome_trace([dict(r0, clock="wall"), dict(r1, clock="wall")])
    first1 = min(e["ts"] for e in shifted["traceEvents"] if e.get("tid") == 1 and e["ph"] == "X")
    assert first1 == pytest.approx(0.5e6)
    if res["png"]:
        assert os.path.getsize(res["png"]) > 1000


def test_profile_context_fake_loop(tmp_path):
    path = str(tmp_path / "trace.json")
    with profile(path, verbose=False) as prof:
        rec = recorder()
        assert rec is not None
        _fake_ring(rec, "fwd", 3, 0.01, 0.004)
        _fake_ring(rec, "bwd", 3, 0.02, 0.004)
        _fake_ring(rec, "fwd", 3, 0.01, 0.004)     # a second call (another layer)
    assert recorder() is None
    trace = json.load(open(path))
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == 15
    # bubble recomputed from the trace itself: waits over each pass's extent
    for phase in ("fwd", "bwd"):
        ev = [e for e in xs if e["args"]["phase"] == phase]
        calls = {e["args"]["call"] for e in ev}
        wall = sum(max(e["ts"] + e["dur"] for e in ev if e["args"]["call"] == c)
                   - min(e["ts"] for e in ev if e["args"]["call"] == c) for c in calls)
        wait = sum(e["dur"] for e in ev if e["cat"] == "wait")
        assert prof.bubble()[phase] == pytest.approx(100 * wait / wall, rel=1e-6)
        assert 0 < prof.bubble()[phase] < 60
    assert len({e["args"]["call"] for e in xs if e["args"]["phase"] == "fwd"}) == 2
    assert prof.merged["bubble"][0] == prof.bubble()


def test_env_mode_flush(tmp_path, monkeypatch):
    path = str(tmp_path / "env.json")
    monkeypatch.setenv(P.ENV, path)
    monkeypatch.setattr(P, "_env_checked", False)
    rec = recorder()
    try:
        assert rec is not None and rec.path == path
        _fake_ring(rec, "fwd", 2, 0.002, 0.001)
    finally:
        res = flush(timeout_s=1)
    assert recorder() is None
    assert os.path.exists(path + ".rank0.json") and set(res["bubble"][0]) == {"fwd"}


def _ranks_fake(rank: int, world: int, path: str) -> dict:
    with profile(path, png=False, verbose=False) as prof:
        # rank 1 waits longer: its peer computes longer
        _fake_ring(recorder(), "fwd", world, 0.01 if rank == 0 else 0.004,
                   0.001 if rank == 0 else 0.007)
    return {"bubble": prof.bubble(), "merged": prof.merged}


def test_profile_gloo_two_ranks_merge(tmp_path):
    path = str(tmp_path / "ring.json")
    out = assert_all_ok(run_ranks(_ranks_fake, 2, tmp_path, path, pg_timeout_s=60))
    assert out[1]["merged"] is None                   # rank 0 merges
    merged = out[0]["merged"]["bubble"]
    assert set(merged) == {0, 1}
    assert merged[1]["fwd"] > merged[0]["fwd"]
    assert merged[1] == pytest.approx(out[1]["bubble"])
    xs = [e for e in json.load(open(path))["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in xs} == {0, 1}


HOOKED = "recorder()" in inspect.getsource(ring_attn.ring)


def _ranks_ring(rank: int, world: int, path: str) -> dict:
    import torch
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    with profile(path, png=False, verbose=False) as prof:
        out = ring_attn.ring.ring_attention(q, k, v, is_causal=True)
        out.sum().backward()
    return {"spans": [tuple(s[:3]) for s in prof.rec.spans]}


@pytest.mark.skipif(not HOOKED, reason="ring.py does not call ring_attn.profile yet "
                                       "(the hook patch is in the plan helper's report)")
def test_profile_ring_end_to_end(tmp_path):
    out = assert_all_ok(run_ranks(_ranks_ring, 2, tmp_path, str(tmp_path / "r.json"),
                                  pg_timeout_s=60))
    for r in out:
        for phase in ("fwd", "bwd"):
            assert (phase, 0, "compute") in r["spans"] and (phase, 1, "compute") in r["spans"]
            assert (phase, 0, "wait") in r["spans"]
