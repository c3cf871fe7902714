"""Ring attention on CPU: per-step compute, waiting, bubble, work balance and per-rank memory.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_ring.py --seq-lens 4096 8192
    python benchmarks/bench_ring.py --sweep        # P = 1, 2, 4; writes benchmarks/results/
    python benchmarks/bench_ring.py --vs-torch-cp  # vs torch's CP ring (torch_cp.py), P = 2, 4

Worker mode (under torchrun) runs ring_attn.ring_attention forward + backward on random
shards [B, H, S/P, D] for every (layout, S) asked, and rank 0 prints one JSON line per
configuration. Per ring step it records, on every rank:
  compute  time inside the step's block kernel call (ring.forward_block / backward_block),
  wait     time blocked on the transfer of the next K/V block (and, in the backward, of the
           travelling dK/dV accumulator) after the compute finished (comm.Pending.wait),
  total    wall time of the step (compute + wait + merges, packing, posting the transfer).
bubble = sum(wait) / sum(total) over the steps of the forward and of the backward. With
--iters N each configuration runs N times and the fastest pass (by its slowest rank) is
reported: the machine is shared, and one slow pass says more about the neighbours.
These are measured by wrapping those three functions of the real ring for the run (no copy
of the ring loop), so the numbers describe the code that ships.

Work balance: per step, max over ranks / min over ranks of the block compute, measured as
wall time and as CPU time of the calling thread (time.thread_time; with one torch thread
per rank the kernel runs on that thread, and CPU time is immune to time-slicing by other
processes on a shared machine), and as the number of (query, key) pairs the schedule
gives each rank (exact, from schedule.py).

Memory: peak resident set (VmHWM, reset through /proc/self/clear_refs) during one forward +
backward minus the resident set before the inputs were made: inputs (q, k, v, dout shards),
output, gradients, K/V buffers in flight and kernel workspaces. MALLOC_MMAP_THRESHOLD_ is
fixed by the sweep so freed buffers go back to the OS between configurations.

Sweep mode launches the workers for P in --worlds, then writes benchmarks/results/ring.md
(tables, machine, command), ring.json (raw) and ring_memory.png (memory vs S for each P).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any, Callable

import torch
import torch.distributed as dist

try:
    import ring_attn
except ImportError:  # a source checkout without `pip install -e .`: use the tree's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ring_attn
from ring_attn.layout import global_positions
from ring_attn.schedule import ring_plan

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


# ------------------------------------------------------------------------- measurement

def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set of this process, MiB."""
    status = open("/proc/self/status").read()
    kib = {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM")}
    return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM <- VmRSS (Linux >= 4.0)


class StepTimer:
    """Wraps the ring's per-step pieces to time them; `steps` maps (phase, step) to
    {"compute", "wait", "total"} seconds of the current call."""

    def __init__(self) -> None:
        self.ring = importlib.import_module("ring_attn.ring")
        self.comm = importlib.import_module("ring_attn.comm")
        self.steps: dict[tuple[str, int], dict[str, float]] = {}
        self._cur: tuple[str, Any] | None = None
        self._phase: str | None = None
        self._step_t0 = 0.0
        self._saved: list[tuple[Any, str, Any]] = []

    def _close_step(self, now: float) -> None:
        if self._cur is not None:
            self.steps[self._cur]["total"] = now - self._step_t0
            self._cur = None

    def _wrap_block(self, phase: str, fn: Callable) -> Callable:
        def block(spec, blk, *args, **kwargs):
            now = time.perf_counter()
            self._close_step(now)
            self._cur, self._step_t0 = (phase, blk.step), now
            self.steps[self._cur] = {"compute": 0.0, "cpu": 0.0, "wait": 0.0, "total": 0.0}
            cpu0 = time.thread_time()
            res = fn(spec, blk, *args, **kwargs)
            self.steps[self._cur]["cpu"] += time.thread_time() - cpu0
            self.steps[self._cur]["compute"] += time.perf_counter() - now
            return res
        return block

    def _wrap_loop(self, phase: str, fn: Callable) -> Callable:
        def loop(*args, **kwargs):
            self._phase = phase
            res = fn(*args, **kwargs)
            self._close_step(time.perf_counter())
            self._phase = None
            return res
        return loop

    def _wrap_post(self, fn: Callable) -> Callable:
        """The first K/V post of a ring call opens a step "pre": what the ring waits for
        before its first block (the backward computes its own block last, so its first
        hop is waited for before any compute) counts in the bubble."""
        def post(held, step):
            if self._cur is None and self._phase is not None:
                self._cur, self._step_t0 = (self._phase, "pre"), time.perf_counter()
                self.steps[self._cur] = {"compute": 0.0, "cpu": 0.0, "wait": 0.0,
                                         "total": 0.0}
            return fn(held, step)
        return post

    def _wrap_wait(self, fn: Callable) -> Callable:
        def wait(pending):
            t0 = time.perf_counter()
            fn(pending)
            if self._cur is not None:
                self.steps[self._cur]["wait"] += time.perf_counter() - t0
        return wait

    def __enter__(self) -> "StepTimer":
        patches = [(self.ring, "forward_block", self._wrap_block("fwd", self.ring.forward_block)),
                   (self.ring, "backward_block",
                    self._wrap_block("bwd", self.ring.backward_block)),
                   (self.ring, "ring_forward",
                    self._wrap_loop("fwd", self.ring.ring_forward)),
                   (self.ring, "ring_backward",
                    self._wrap_loop("bwd", self.ring.ring_backward)),
                   (self.comm.HeldKV, "post", self._wrap_post(self.comm.HeldKV.post)),
                   (self.comm.Pending, "wait", self._wrap_wait(self.comm.Pending.wait))]
        for obj, name, new in patches:
            self._saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, new)
        return self

    def __exit__(self, *exc: Any) -> None:
        for obj, name, old in reversed(self._saved):
            setattr(obj, name, old)
        self._saved.clear()


def schedule_pairs(rank: int, world: int, layout: str, causal: bool, s_local: int) -> list[int]:
    """(query, key) pairs rank computes at each step, from the ring's own schedule."""
    pairs = []
    for blk in ring_plan(rank, world, layout, causal, s_local):
        if blk.skip:
            pairs.append(0)
        elif not blk.band:
            pairs.append(blk.q_len * blk.k_len)
        else:
            qp = global_positions(rank, world, s_local, layout).narrow(0, blk.q_start, blk.q_len)
            kp = global_positions(blk.source, world, s_local, layout).narrow(
                0, blk.k_start, blk.k_len).sort().values
            pairs.append(int(torch.searchsorted(kp, qp, right=True).sum()))
    return pairs


# ------------------------------------------------------------------------- worker

def measure(args: argparse.Namespace, world: int, layout: str, seq_len: int,
            causal: bool, rank: int) -> dict[str, Any]:
    """This rank's timings of --iters forward + backward passes (the fastest pass, chosen
    by the slowest rank's time so all ranks report the same pass) and its peak memory."""
    shape = (args.batch, args.heads, seq_len // world, args.head_dim)
    g = torch.Generator().manual_seed(1000 + rank)
    reset_peak_rss()
    base = rss_mib()[0]
    q, k, v, dout = (torch.randn(shape, generator=g).to(DTYPES[args.dtype]) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    passes = []
    for _ in range(args.iters):
        q.grad = k.grad = v.grad = None
        dist.barrier()
        with StepTimer() as timer:
            t0 = time.perf_counter()
            out = ring_attn.ring_attention(q, k, v, is_causal=causal, layout=layout)
            t1 = time.perf_counter()
            out.backward(dout)
            t2 = time.perf_counter()
        del out
        slowest = torch.tensor([t2 - t0], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        passes.append((slowest.item(), {f"{ph}{st}": d for (ph, st), d in timer.steps.items()},
                       t1 - t0, t2 - t1))
    _, steps, fwd_s, bwd_s = min(passes, key=lambda p: p[0])
    return {"steps": steps, "fwd_s": fwd_s, "bwd_s": bwd_s, "peak_mib": rss_mib()[1] - base}


def run_config(args: argparse.Namespace, rank: int, world: int, layout: str, seq_len: int,
               causal: bool) -> dict[str, Any]:
    s_local = seq_len // world
    mine = measure(args, world, layout, seq_len, causal, rank)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank != 0:
        return {}
    res: dict[str, Any] = dict(world=world, seq_len=seq_len, s_local=s_local, layout=layout,
                               causal=causal, batch=args.batch, heads=args.heads,
                               head_dim=args.head_dim, dtype=args.dtype, iters=args.iters,
                               threads=torch.get_num_threads(), ranks=gathered)
    for phase in ("fwd", "bwd"):
        keys = [f"{phase}{t}" for t in range(world)]
        every = [f"{phase}pre"] + keys  # "pre": waits before the first block (StepTimer)
        wait = [sum(r["steps"].get(key, {}).get("wait", 0.0) for key in every)
                for r in gathered]
        total = [sum(r["steps"].get(key, {}).get("total", 0.0) for key in every)
                 for r in gathered]
        comp = [sum(r["steps"][key]["compute"] for key in keys) for r in gathered]
        res[f"{phase}_compute_s"] = max(comp)
        res[f"{phase}_wait_s"] = max(wait)
        res[f"{phase}_steps_s"] = max(total)
        res[f"{phase}_bubble_pct"] = 100 * max(w / t for w, t in zip(wait, total) if t > 0)
        skips = any(blk.skip for rk in range(world)
                    for blk in ring_plan(rk, world, layout, causal, s_local))
        for what in ("compute", "cpu"):
            ratios = [max(r["steps"][key][what] for r in gathered)
                      / max(min(r["steps"][key][what] for r in gathered), 1e-9) for key in keys]
            ratios = [float("inf")] if skips else ratios
            res[f"{phase}_{what}_balance_worst"] = max(ratios)
            res[f"{phase}_{what}_balance_mean"] = sum(ratios) / len(ratios)
        res[f"{phase}_total_balance"] = max(comp) / max(min(comp), 1e-9)
    pairs = [schedule_pairs(r, world, layout, causal, s_local) for r in range(world)]
    # A step where some rank skips its block (contiguous, causal) is unbalanced without bound.
    res["schedule_balance"] = max(max(col) / min(col) if min(col) else float("inf")
                                  for col in zip(*pairs))
    res["schedule_total_balance"] = max(map(sum, pairs)) / max(min(map(sum, pairs)), 1)
    res["fwd_bwd_s"] = max(r["fwd_s"] + r["bwd_s"] for r in gathered)
    res["peak_mib"] = max(r["peak_mib"] for r in gathered)
    return res


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    # Warm-up, untimed: the first configuration once (thread pools, gloo pairs, kernel
    # scratch, first-touch page faults; the first call measured 2x slower at S=1024).
    run_config(args, rank, world, args.layouts[0], min(args.seq_lens), args.causal[0])
    out = open(args.out, "a") if args.out and rank == 0 else None
    for layout in args.layouts:
        for seq_len in args.seq_lens:
            for causal in args.causal:
                if seq_len % (2 * world):
                    continue
                res = run_config(args, rank, world, layout, seq_len, causal)
                if rank == 0:
                    line = json.dumps(res)
                    print(f"P={world} {layout} S={seq_len} causal={causal}: fwd+bwd "
                          f"{res['fwd_bwd_s']:.2f} s, bubble fwd {res['fwd_bubble_pct']:.1f}% "
                          f"bwd {res['bwd_bubble_pct']:.1f}%, peak {res['peak_mib']:.0f} MiB",
                          flush=True)
                    if out:
                        out.write(line + "\n")
                        out.flush()
    dist.destroy_process_group()


# ------------------------------------------------------------------------- sweep

def machine_info() -> dict[str, str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except Exception:  # lscpu missing: report what platform knows
        model = platform.processor() or "unknown"
    return {"cpu": model, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def launch(world: int, args: argparse.Namespace, out_path: str, layouts: list[str],
           seq_lens: list[int]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={world}", os.path.abspath(__file__), "--out", out_path,
           "--layouts", *layouts, "--seq-lens", *map(str, seq_lens),
           "--batch", str(args.batch), "--heads", str(args.heads),
           "--head-dim", str(args.head_dim), "--dtype", args.dtype,
           "--iters", str(max(args.iters, 2))]
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, env=env)


def write_report(rows: list[dict[str, Any]], info: dict[str, str], command: str,
                 balance_len: int) -> str:
    single = {r["seq_len"]: r["peak_mib"] for r in rows
              if r["world"] == 1 and r["layout"] == "zigzag"}
    lines = [
        "# Ring attention on CPU (gloo): steps, bubble, balance, memory",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, "
        f"Python {info['python']}; {info['date']}; load average (1, 5, 15 min) at the start "
        f"{info['load_start']}, at the end {info['load']}.",
        f"Command: `{command}`",
        "",
        f"Shapes B={rows[0]['batch']} H={rows[0]['heads']} D={rows[0]['head_dim']} "
        f"{rows[0]['dtype']}, causal; each configuration run {rows[0]['iters']} times, the "
        "fastest pass reported (by its slowest rank). torch threads per rank = "
        "max(1, cores // P): with P=4 the 4 ranks share 2 cores (1 thread each, "
        "oversubscribed), so their times include time-slicing and their waits include peers "
        "that were descheduled. Other jobs shared the machine (load averages above), so wall "
        "times, waits and bubbles carry their noise; CPU-time balance does not.",
        "",
        "## Steps and bubble (zigzag)",
        "",
        "bubble = time blocked on the next K/V (and dK/dV) transfer after compute / wall time "
        "of the ring steps, worst rank. Target: < 5% at S_local >= 4k. Memory: worst rank's "
        "peak RSS over fwd+bwd (inputs included) vs the P=1 run at the same S; target "
        "<= 1/P of it + 5%.",
        "",
        "| P | S | S_local | fwd+bwd s | fwd compute s | fwd wait s | fwd bubble | "
        "bwd compute s | bwd wait s | bwd bubble | peak MiB/rank | P=1 MiB | rank/(P=1/P) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in rows if r["layout"] == "zigzag"),
                    key=lambda r: (r["seq_len"], r["world"])):
        one = single.get(r["seq_len"])
        one_s = f"{one:.0f}" if one else "n/a"
        ratio = f"{r['peak_mib'] / (one / r['world']):.2f}" if one else "n/a"
        lines.append(
            f"| {r['world']} | {r['seq_len']} | {r['s_local']} | {r['fwd_bwd_s']:.2f} | "
            f"{r['fwd_compute_s']:.2f} | {r['fwd_wait_s']:.3f} | {r['fwd_bubble_pct']:.1f}% | "
            f"{r['bwd_compute_s']:.2f} | {r['bwd_wait_s']:.3f} | {r['bwd_bubble_pct']:.1f}% | "
            f"{r['peak_mib']:.0f} | {one_s} | {ratio} |")
    lines += [
        "",
        f"## Causal work balance (S={balance_len})",
        "",
        "Per ring step, max over ranks / min over ranks of the block's compute, as worst step "
        "/ mean over steps: in wall time, in CPU time of the calling thread (1 thread per "
        "rank at P >= 2, so the kernel runs on it; CPU time does not count time-slicing by "
        "other processes, wall time does), and in (query, key) pairs the schedule assigns "
        "(exact). inf where some rank skips its block at that step. Last column: the wall "
        "ratio over the whole pass (sum over steps). Target: <= 1.05 with zigzag and striped.",
        "",
        "| layout | P | fwd wall | fwd CPU | bwd wall | bwd CPU | schedule (pairs) | "
        "whole pass wall fwd / bwd, schedule |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pair(r: dict[str, Any], key: str) -> str:
        return f"{r[key + '_balance_worst']:.3f} / {r[key + '_balance_mean']:.3f}"

    for r in sorted((r for r in rows if r["seq_len"] == balance_len and r["world"] > 1),
                    key=lambda r: (r["layout"], r["world"])):
        lines.append(f"| {r['layout']} | {r['world']} | {pair(r, 'fwd_compute')} | "
                     f"{pair(r, 'fwd_cpu')} | {pair(r, 'bwd_compute')} | {pair(r, 'bwd_cpu')} | "
                     f"{r['schedule_balance']:.3f} | "
                     f"{r['fwd_total_balance']:.2f} / {r['bwd_total_balance']:.2f}, "
                     f"{r['schedule_total_balance']:.2f} |")
    lines += ["", "![per-rank memory](ring_memory.png)", ""]
    return "\n".join(lines)


def plot_memory(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    by_p: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["layout"] == "zigzag":
            by_p[r["world"]].append((r["seq_len"], r["peak_mib"]))
    single = dict(sorted(by_p.get(1, [])))
    for p, pts in sorted(by_p.items()):
        pts.sort()
        line, = ax.plot([s for s, _ in pts], [m for _, m in pts], "o-", label=f"P={p}")
        if p > 1 and single:
            xs = [s for s, _ in pts if s in single]
            ax.plot(xs, [single[s] / p for s in xs], "--", color=line.get_color(), alpha=0.6,
                    label=f"P=1 / {p} (ideal)")
    ax.set_xscale("log", base=2)
    ticks = sorted({r["seq_len"] for r in rows if r["layout"] == "zigzag"})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("sequence length S (tokens, all ranks)")
    ax.set_ylabel("peak memory per rank (MiB)")
    r0 = rows[0]
    ax.set_title(f"ring attention fwd+bwd, CPU, B={r0['batch']} H={r0['heads']} "
                 f"D={r0['head_dim']} {r0['dtype']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sweep(args: argparse.Namespace) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    raw = os.path.join(RESULTS, "ring.jsonl")
    if os.path.exists(raw):
        os.remove(raw)
    t0 = time.perf_counter()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    for world in args.worlds:
        launch(world, args, raw, ["zigzag"], args.seq_lens)
        if world > 1:
            launch(world, args, raw, ["striped", "contiguous"], [args.balance_len])
    rows = [json.loads(line) for line in open(raw)]
    command = "python benchmarks/bench_ring.py " + " ".join(sys.argv[1:])
    report = write_report(rows, dict(machine_info(), load_start=load_start), command,
                          args.balance_len)
    report += f"\nSweep wall time: {time.perf_counter() - t0:.0f} s.\n"
    save_results("ring", report, rows, raw)
    plot_memory(rows, os.path.join(RESULTS, "ring_memory.png"))


def vs_torch_cp(args: argparse.Namespace) -> None:
    """ring_attn vs torch's context-parallel ring (both rotate methods), each P launched
    under torchrun; writes results/ring_vs_torch_cp.md and .json."""
    import torch_cp
    os.makedirs(RESULTS, exist_ok=True)
    raw = os.path.join(RESULTS, "ring_vs_torch_cp.jsonl")
    if os.path.exists(raw):
        os.remove(raw)
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    for world in args.worlds:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", os.path.abspath(__file__), "--torch-cp-worker",
               "--out", raw, "--seq-lens", *map(str, args.seq_lens), "--dtypes", *args.dtypes,
               "--heads", str(args.heads), "--head-dim", str(args.head_dim),
               "--iters", str(args.iters), "--threads", str(args.threads),
               "--budget-s", str(args.budget_s / len(args.worlds))]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
                   MALLOC_MMAP_THRESHOLD_="131072")  # freed buffers leave the RSS
        print("+", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env=env)
    rows = [json.loads(line) for line in open(raw)]
    info = machine_info()
    machine = (f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, Python "
               f"{info['python']}; {info['date']}; load average at the start {load_start}, "
               f"at the end {info['load']}; sweep wall time {time.perf_counter() - t0:.0f} s.")
    text = torch_cp.report(rows, machine, "python benchmarks/bench_ring.py "
                           + " ".join(sys.argv[1:]))
    save_results("ring_vs_torch_cp", text, rows, raw)


def save_results(stem: str, text: str, rows: list, raw: str) -> None:
    """results/<stem>.md (the report) and .json (the rows); the spawned ranks' raw
    JSON-lines file is removed; the report is printed."""
    with open(os.path.join(RESULTS, f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, f"{stem}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    os.remove(raw)
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", action="store_true", help="launch torchrun for each P in --worlds")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--balance-len", type=int, default=8192,
                   help="S of the striped/contiguous runs that complete the balance table")
    p.add_argument("--layouts", nargs="+", default=["zigzag"],
                   choices=["zigzag", "striped", "contiguous"])
    p.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="+",
                   default=[True])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--iters", type=int, default=1,
                   help="passes per configuration; the fastest is reported (sweep: 2)")
    p.add_argument("--out", default="", help="append one JSON line per configuration")
    p.add_argument("--vs-torch-cp", action="store_true",
                   help="ring_attn vs torch's context-parallel ring, for each P in --worlds "
                        "(default 2 4), causal and not, each of --dtypes")
    p.add_argument("--torch-cp-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                   choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1,
                   help="--vs-torch-cp: torch threads per rank, both sides")
    p.add_argument("--budget-s", type=float, default=900,
                   help="--vs-torch-cp: configurations left when it is spent are reported "
                        "as not run")
    args = p.parse_args()
    if args.torch_cp_worker:
        import torch_cp
        torch_cp.worker(args, rss_mib, reset_peak_rss)
    elif args.vs_torch_cp:
        if args.worlds == [1, 2, 4]:
            args.worlds = [2, 4]
        vs_torch_cp(args)
    elif args.sweep:
        sweep(args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
