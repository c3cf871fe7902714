"""Spawn a gloo process group for a test, run a function on every rank, collect results.

Each rank is a fresh `spawn` process (no inherited state) that joins a gloo group through
a FileStore in the test's tmp_path with a short timeout, runs `fn(rank, world_size,
*args)` and writes what it returns (or its traceback) to a file. The parent waits with a
deadline and kills any straggler, so a broken ring fails the test instead of hanging it.
Batch many configurations into one `fn` call: starting a process and importing torch
costs ~3-5 s, the configurations themselves milliseconds.
"""
from __future__ import annotations

import datetime
import os
import pickle
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch.multiprocessing as mp


@dataclass
class RankResult:
    rank: int
    ok: bool
    value: Any = None      # fn's return value when ok
    error: str = ""        # traceback text when not ok, or why no result came back


def _entry(fn: Callable, rank: int, world_size: int, store_path: str, out_dir: str,
           pg_timeout_s: float, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # up to 4 ranks share the 2 cores of CI
    result = RankResult(rank, False)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        try:
            result = RankResult(rank, True, fn(rank, world_size, *args))
        finally:
            if not fn_keeps_group(fn):
                dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, which asserts
        result = RankResult(rank, False, error=traceback.format_exc())
    with open(os.path.join(out_dir, f"rank{rank}.pkl.tmp"), "wb") as f:
        pickle.dump(result, f)
    os.replace(os.path.join(out_dir, f"rank{rank}.pkl.tmp"),
               os.path.join(out_dir, f"rank{rank}.pkl"))
    # The result is on disk: skip interpreter teardown (gloo and thread-pool destructors
    # take seconds, and can block when a peer died).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fn_keeps_group(fn: Callable) -> bool:
    """A function may set `keep_group = True` to skip destroy_process_group (e.g. when a
    peer died and tearing down would block)."""
    return bool(getattr(fn, "keep_group", False))


def run_ranks(fn: Callable, world_size: int, tmp_path: Any, *args: Any,
              pg_timeout_s: float = 30.0, join_timeout_s: float = 180.0) -> list[RankResult]:
    """Run fn(rank, world_size, *args) on world_size spawned gloo ranks; fn must be a
    module-level function of an importable module (spawn pickles it by name)."""
    tag = f"pg{world_size}_{time.monotonic_ns()}"
    out_dir = os.path.join(str(tmp_path), tag)
    os.makedirs(out_dir)
    store_path = os.path.join(out_dir, "store")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, store_path, out_dir,
                                              pg_timeout_s, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + join_timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    results = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join(5)
            results.append(RankResult(r, False, error=f"rank {r} still running after "
                                                      f"{join_timeout_s} s: killed"))
            continue
        path = os.path.join(out_dir, f"rank{r}.pkl")
        if not os.path.exists(path):
            results.append(RankResult(r, False, error=f"rank {r} exited with code "
                                                      f"{p.exitcode} and no result"))
            continue
        with open(path, "rb") as f:
            results.append(pickle.load(f))
    return results


def assert_all_ok(results: list[RankResult]) -> list[Any]:
    """The ranks' return values, or an AssertionError carrying every failing traceback."""
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(f"--- rank {r.rank} ---\n{r.error}" for r in bad)
    return [r.value for r in results]


def on_subgroups(rank: int, world_size: int, check: Callable[[int, int, Any], Any]) -> dict:
    """Inside a spawned rank: for P = 1 .. world_size, a subgroup of the LAST P ranks (so
    group ranks differ from global ranks) and check(group_rank, P, group) on its members.
    Returns {P: check's value} for the subgroups this rank is in. new_group and the barrier
    are collectives over the world: every rank takes part in each."""
    import torch.distributed as dist
    results = {}
    for p in range(1, world_size + 1):
        members = list(range(world_size - 1, world_size - 1 - p, -1))
        group = dist.new_group(members)
        if rank in members:
            results[p] = check(dist.get_rank(group), p, group)
        dist.barrier()
    return results


def assert_subgroup_results(per_rank: list[dict[int, tuple[int, list[str]]]], world_size: int,
                            min_cases: int) -> None:
    """Results of a spawn that ran world sizes 1..world_size as subgroups of the last P
    ranks ({P: (cases run, failures)} per rank): every rank ran every P it belongs to, at
    least min_cases cases each, with no failure."""
    for rank, per_p in enumerate(per_rank):
        want = list(range(world_size - rank, world_size + 1))
        assert sorted(per_p) == want, f"rank {rank} ran P={sorted(per_p)}, expected {want}"
        for p, (n, failures) in per_p.items():
            assert n >= min_cases, f"P={p} rank {rank} ran only {n} cases"
            assert not failures, "\n".join(failures)
