"""Profiler: per rank and ring step, the compute time and the time waiting for the next block.

    with ring_attn.profile("trace.json") as prof:     # or RING_ATTN_PROFILE=trace.json
        loss = model(batch); loss.backward()
    print(prof.bubble())                              # {phase: bubble %} of this rank

The ring driver brackets each step's kernel call and each wait on a transfer:

    rec = profile.recorder()                          # None when off: one global read
    with profile.span(rec, "fwd", blk.step, "compute"):
        acc = forward_block(...)
    with profile.span(rec, "fwd", blk.step, "wait"):
        pending.wait()

Off, `span` returns one shared no-op context: 0.6 us per span on the loaded 2-core VM
(on: 5 us), 3 spans per ring step against steps of milliseconds (bench_ring: 70 ms
forward at S = 4096) -- below 0.01%. On, it appends (phase, step, kind, t0, t1) per
span. On exit every rank writes `<path>.rank<r>.json`; after a barrier rank 0 merges them
into `<path>` (a Chrome trace: chrome://tracing or ui.perfetto.dev, one lane per rank),
`<path without .json>.png` (a timeline, when matplotlib is installed) and prints the
bubble % per rank. Under RING_ATTN_PROFILE (unmodified scripts) each rank writes its file
at exit and rank 0 merges the files present after up to 10 s; `merge(paths, out)` merges
by hand.

bubble(phase) = time in "wait" spans / wall time of that phase's passes, where a pass is
one ring call from its first span's start to its last span's end (bench_ring.py's rule).
Times are aligned across ranks at the barrier taken on entry (same host or not); in the
environment-variable mode, by the wall clock.
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import json
import os
import time
from typing import Any, Iterator, Optional

ENV = "RING_ATTN_PROFILE"
_NULL = contextlib.nullcontext()
_active: Optional["Recorder"] = None
_env_checked = False


class Recorder:
    """This rank's spans; times in seconds from `origin` (perf_counter)."""

    def __init__(self, path: str, rank: int = 0, world: int = 1, clock: str = "wall") -> None:
        self.path, self.rank, self.world, self.clock = path, rank, world, clock
        self.origin = time.perf_counter()
        self.wall_origin = time.time()   # wall clock at origin (aligns the env mode)
        self.spans: list[tuple[str, int, str, float, float, int]] = []
        self._calls: dict[str, int] = {}
        self._begun: set[str] = set()   # phases whose calls are marked by begin()

    def begin(self, phase: str) -> None:
        """A new ring call of phase starts (ring.py marks each; without it, a call starts
        at its step 0's compute span -- the backward computes its step 0 last)."""
        self._begun.add(phase)
        self._calls[phase] = self._calls.get(phase, -1) + 1

    @contextlib.contextmanager
    def span(self, phase: str, step: int, kind: str) -> Iterator[None]:
        if step == 0 and kind == "compute" and phase not in self._begun:
            self._calls[phase] = self._calls.get(phase, -1) + 1
        call = self._calls.get(phase, 0)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.spans.append((phase, step, kind, t0 - self.origin,
                               time.perf_counter() - self.origin, call))

    def record(self) -> dict[str, Any]:
        return {"rank": self.rank, "world": self.world, "clock": self.clock,
                "wall_origin": self.wall_origin, "spans": self.spans}

    def bubble(self) -> dict[str, float]:
        return bubble(self.record())

    def write(self) -> str:
        out = rank_path(self.path, self.rank)
        with open(out, "w") as f:
            json.dump(self.record(), f)
        return out


def recorder() -> Optional[Recorder]:
    """The active recorder, or None (profiling off). The first call in a process reads
    RING_ATTN_PROFILE once."""
    global _env_checked
    if not _env_checked:
        _env_checked = True
        if os.environ.get(ENV) and _active is None:
            _start_from_env(os.environ[ENV])
    return _active


def begin(rec: Optional[Recorder], phase: str) -> None:
    """Mark the start of a ring call of phase (no-op when rec is None)."""
    if rec is not None:
        rec.begin(phase)


def span(rec: Optional[Recorder], phase: str, step: int, kind: str):
    """A context timing one span of `rec`; a shared no-op context when rec is None."""
    return _NULL if rec is None else rec.span(phase, step, kind)


def _rank_world() -> tuple[int, int, bool]:
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), True
    except ImportError:
        pass
    return 0, 1, False


def rank_path(path: str, rank: int) -> str:
    return f"{path}.rank{rank}.json"


class profile:  # noqa: N801 - used as `with ring_attn.profile(path)`, like torch.profiler
    """Record the ring's steps on every rank for the body; merge on exit (see module)."""

    def __init__(self, path: str, png: bool = True, verbose: bool = True) -> None:
        self.path, self.png, self.verbose = path, png, verbose
        self.rec: Optional[Recorder] = None
        self.merged: Optional[dict[str, Any]] = None

    def __enter__(self) -> "profile":
        global _active
        if _active is not None:
            raise RuntimeError("ring_attn.profile: a profile is already active; nesting "
                               "is not supported")
        rank, world, dist_on = _rank_world()
        if dist_on:
            import torch.distributed as dist
            dist.barrier()   # a common origin on every rank (to ~the barrier's skew)
        self.rec = Recorder(self.path, rank, world, "barrier" if dist_on else "wall")
        _active = self.rec
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        _active = None
        self.rec.write()
        rank, world, dist_on = _rank_world()
        if dist_on:
            import torch.distributed as dist
            dist.barrier()
        if rank == 0:
            files = [rank_path(self.path, r) for r in range(world)]
            self.merged = merge(files, self.path, self.png, self.verbose)

    def bubble(self) -> dict[str, float]:
        return self.rec.bubble()


def _start_from_env(path: str) -> None:
    global _active
    rank, world, _ = _rank_world()
    _active = Recorder(path, rank, world, "wall")
    atexit.register(flush)


def flush(timeout_s: float = 10.0) -> Optional[dict[str, Any]]:
    """End the RING_ATTN_PROFILE recording (run at exit): write this rank's file; rank 0
    merges the rank files present within timeout_s. Returns what merge returns (rank 0)."""
    global _active
    rec, _active = _active, None
    atexit.unregister(flush)
    if rec is None:
        return None
    rec.write()
    if rec.rank != 0:
        return None
    want = [rank_path(rec.path, r) for r in range(rec.world)]
    deadline = time.time() + timeout_s
    while time.time() < deadline and not all(os.path.exists(p) for p in want):
        time.sleep(0.1)
    return merge([p for p in want if os.path.exists(p)], rec.path)


# --------------------------------------------------------------------------- analysis

def passes(rec: dict[str, Any]) -> dict[tuple[str, int], tuple[float, float]]:
    """(phase, call) -> (start, end) of each ring pass."""
    out: dict[tuple[str, int], tuple[float, float]] = {}
    for phase, _step, _kind, t0, t1, call in rec["spans"]:
        a, b = out.get((phase, call), (t0, t1))
        out[(phase, call)] = (min(a, t0), max(b, t1))
    return out


def bubble(rec: dict[str, Any]) -> dict[str, float]:
    """{phase: % of the phase's pass wall time spent in wait spans} for one rank."""
    wall: dict[str, float] = {}
    for (phase, _call), (a, b) in passes(rec).items():
        wall[phase] = wall.get(phase, 0.0) + (b - a)
    wait: dict[str, float] = {}
    for phase, _step, kind, t0, t1, _call in rec["spans"]:
        if kind == "wait":
            wait[phase] = wait.get(phase, 0.0) + (t1 - t0)
    return {ph: 100.0 * wait.get(ph, 0.0) / w for ph, w in wall.items() if w > 0}


def chrome_trace(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One Chrome trace: pid 0, one thread (lane) per rank, complete ("X") events in us."""
    base = min((r["wall_origin"] for r in records), default=0.0)
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0,
                                     "args": {"name": "ring_attn"}}]
    for r in records:
        # barrier mode: every rank's origin is the barrier; wall mode: shift by the clock
        shift = 0.0 if r["clock"] == "barrier" else r["wall_origin"] - base
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r["rank"],
                       "args": {"name": f"rank {r['rank']}"}})
        for phase, step, kind, t0, t1, call in r["spans"]:
            events.append({"name": f"{phase} step {step} {kind}", "cat": kind, "ph": "X",
                           "pid": 0, "tid": r["rank"], "ts": (t0 + shift) * 1e6,
                           "dur": (t1 - t0) * 1e6,
                           "args": {"phase": phase, "step": step, "call": call}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def timeline_png(records: list[dict[str, Any]], out: str) -> bool:
    """One lane per rank, compute green and wait red; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    base = min((r["wall_origin"] for r in records), default=0.0)
    fig, ax = plt.subplots(figsize=(10, 1 + 0.5 * len(records)))
    for r in records:
        shift = 0.0 if r["clock"] == "barrier" else r["wall_origin"] - base
        for kind, color in (("compute", "tab:green"), ("wait", "tab:red")):
            bars = [((t0 + shift) * 1e3, (t1 - t0) * 1e3) for _p, _s, k, t0, t1, _c
                    in r["spans"] if k == kind]
            ax.broken_barh(bars, (r["rank"] - 0.4, 0.8), color=color,
                           label=kind if r is records[0] else None)
    ax.set_yticks([r["rank"] for r in records], [f"rank {r['rank']}" for r in records])
    ax.set_xlabel("ms")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def merge(paths: list[str], out: str, png: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Merge per-rank files into one Chrome trace at `out` (+ PNG); returns
    {"bubble": {rank: {phase: %}}, "png": path or None}."""
    paths = paths or sorted(glob.glob(f"{out}.rank*.json"))
    records = []
    for p in paths:
        with open(p) as f:
            records.append(json.load(f))
    records.sort(key=lambda r: r["rank"])
    with open(out, "w") as f:
        json.dump(chrome_trace(records), f)
    png_path = (out[:-5] if out.endswith(".json") else out) + ".png"
    drew = png and timeline_png(records, png_path)
    bubbles = {r["rank"]: bubble(r) for r in records}
    if verbose:
        for rank, b in bubbles.items():
            print(f"ring_attn.profile: rank {rank} bubble "
                  + ", ".join(f"{ph} {v:.1f}%" for ph, v in sorted(b.items())), flush=True)
    return {"bubble": bubbles, "png": png_path if drew else None, "trace": out}
