"""Sliding-window attention: what a window saves on the ring, and on one device.

    python benchmarks/bench_window.py                    # S=65536, P=4, window 4096
    python benchmarks/bench_window.py --seq-len 16384 --local-seq-len 4096   # quicker

Ring (CPU, gloo, P processes spawned here, one torch thread each): forward + backward of
ring_attn.ring_attention on random shards [B, H, S/P, D], causal, for
  * the full causal ring (zigzag, the balanced layout; and contiguous),
  * window (left, 0) with layout="auto" (resolves to contiguous: K/V travel
    ceil(left / S_local) hops, carrying only the rows the window reaches),
  * the same window with zigzag (neighbours scattered: every hop still needed).
Time: the slowest rank's wall time of the fastest of --iters passes. Bytes: what each
rank's RingComm actually sent (ring_attn.comm.record_traffic), forward and backward, the
largest over ranks. Ratios are taken within this one run.

One device (all cores): ring_attn's kernel with the window (ops.attn_fwd with is_causal and
window_left, forward and forward + backward) against torch's SDPA given the same band as an
explicit bool mask, at --local-seq-len; their outputs are compared too.

Writes benchmarks/results/window.md (tables, machine, command) and window.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    import ring_attn
except ImportError:  # a source checkout without `pip install -e .`: use the tree's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ring_attn
from ring_attn import ops
from ring_attn.comm import record_traffic
from ring_attn.layout import resolve_layout

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def machine_info() -> dict[str, str]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
        isa = "avx512" if "avx512f" in lscpu else "avx2" if "avx2" in lscpu else "?"
    except Exception:  # lscpu missing: report what platform knows
        model, isa = platform.processor() or "unknown", "?"
    return {"cpu": model, "isa": isa, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


# ------------------------------------------------------------------------- ring

def _ring_configs(args: argparse.Namespace, world: int) -> list[tuple[str, str, Any]]:
    w = (args.window, 0)
    auto = resolve_layout("auto", w, world, args.seq_len, is_causal=True)
    return [("full causal", "zigzag", None), ("full causal", "contiguous", None),
            (f"window {args.window}, layout auto", auto, w),
            (f"window {args.window}", "zigzag", w)]


def _measure(args: argparse.Namespace, rank: int, world: int, layout: str, window
             ) -> dict[str, Any]:
    shape = (args.batch, args.heads, args.seq_len // world, args.head_dim)
    g = torch.Generator().manual_seed(1000 + rank)
    q, k, v, dout = (torch.randn(shape, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    best = None
    for _ in range(args.iters):
        q.grad = k.grad = v.grad = None
        dist.barrier()
        t0 = time.perf_counter()
        with record_traffic() as fwd:
            out = ring_attn.ring_attention(q, k, v, is_causal=True, layout=layout,
                                           window=window)
        t1 = time.perf_counter()
        with record_traffic() as bwd:
            out.backward(dout)
        t2 = time.perf_counter()
        times = torch.tensor([t1 - t0, t2 - t0], dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        sent = torch.tensor([fwd.bytes, bwd.bytes, fwd.count(), bwd.count()],
                            dtype=torch.int64)
        dist.all_reduce(sent, op=dist.ReduceOp.MAX)
        res = dict(fwd_s=times[0].item(), fwd_bwd_s=times[1].item(),
                   fwd_bytes=int(sent[0]), bwd_bytes=int(sent[1]), fwd_msgs=int(sent[2]),
                   bwd_msgs=int(sent[3]))
        if best is None or res["fwd_bwd_s"] < best["fwd_bwd_s"]:
            best = res
    return best


def _worker(rank: int, world: int, store_path: str, args: argparse.Namespace,
            out_path: str) -> None:
    torch.set_num_threads(1)  # P ranks share the cores
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=1800))
    rows = []
    # Warm-up, untimed, small: thread pools, gloo pairs, first-touch page faults.
    warm = argparse.Namespace(**{**vars(args), "seq_len": 2048 * world, "iters": 1})
    _measure(warm, rank, world, "contiguous", (512, 0))
    for name, layout, window in _ring_configs(args, world):
        res = _measure(args, rank, world, layout, window)
        rows.append(dict(config=name, layout=layout, window=window, **res))
        if rank == 0:
            print(f"  {name} ({layout}): fwd+bwd {res['fwd_bwd_s']:.2f} s, sent "
                  f"{(res['fwd_bytes'] + res['bwd_bytes']) / 2**20:.1f} MiB", flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def run_ring(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ring.json")
        mp.start_processes(_worker, args=(args.world, os.path.join(tmp, "store"), args, out),
                           nprocs=args.world, join=True, start_method="spawn")
        return json.load(open(out))


# ------------------------------------------------------------------------- one device

def _time(fn, iters: int) -> float:
    best = math.inf
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_local(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count() or 1)
    s, left = args.local_seq_len, args.window
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, s, args.head_dim)
    q, k, v, dout = (torch.randn(shape, generator=g) for _ in range(4))
    i = torch.arange(s).view(-1, 1)
    j = torch.arange(s).view(1, -1)
    band = (j <= i) & (j >= i - left)
    scale = 1.0 / math.sqrt(args.head_dim)

    def ours(backward: bool):
        xs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
        out = ops.attn_fwd(*xs, is_causal=True, scale=scale, window_left=left)[0]
        if backward:
            out.backward(dout)
        return out

    def theirs(backward: bool):
        xs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*xs, attn_mask=band)
        if backward:
            out.backward(dout)
        return out

    with torch.no_grad():
        diff = (ours(False) - theirs(False)).abs().max().item()
    res = dict(seq_len=s, window=left, max_abs_diff=diff)
    for name, fn in (("ours", ours), ("torch", theirs)):
        res[f"{name}_fwd_s"] = _time(lambda: fn(False), args.iters)
        res[f"{name}_fwd_bwd_s"] = _time(lambda: fn(True), args.iters)
    return res


# ------------------------------------------------------------------------- report

def report(args: argparse.Namespace, info: dict[str, str], load_start: str,
           ring: list[dict[str, Any]], local: dict[str, Any], wall: float) -> str:
    base = ring[0]
    mib = 2 ** 20
    lines = [
        "# Sliding window: ring time and bytes, and the windowed kernel on one device",
        "",
        f"Machine: {info['cpu']} ({info['isa']}), {info['cores']} cores; torch "
        f"{info['torch']}, Python {info['python']}; {info['date']}; load average (1, 5, "
        f"15 min) at the start {load_start}, at the end {info['load']}.",
        f"Command: `python benchmarks/bench_window.py {' '.join(sys.argv[1:])}`",
        "",
        f"## Ring: P={args.world} gloo ranks, S={args.seq_len}, causal",
        "",
        f"Shapes B={args.batch} H={args.heads} D={args.head_dim} float32, S_local="
        f"{args.seq_len // args.world}; one torch thread per rank ({args.world} ranks share "
        f"{info['cores']} cores). Time: slowest rank, fastest of {args.iters} pass(es). "
        "Bytes and messages: sent by one rank (the largest over ranks), as counted by "
        "ring_attn.comm.record_traffic. Ratios against the first row.",
        "",
        "| configuration | layout | fwd s | fwd+bwd s | time ratio | fwd MiB | bwd MiB "
        "| fwd msgs | bwd msgs | bytes ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ring:
        total = r["fwd_bytes"] + r["bwd_bytes"]
        base_total = base["fwd_bytes"] + base["bwd_bytes"]
        lines.append(
            f"| {r['config']} | {r['layout']} | {r['fwd_s']:.2f} | {r['fwd_bwd_s']:.2f} | "
            f"{base['fwd_bwd_s'] / r['fwd_bwd_s']:.1f}x | {r['fwd_bytes'] / mib:.1f} | "
            f"{r['bwd_bytes'] / mib:.1f} | {r['fwd_msgs']} | {r['bwd_msgs']} | "
            f"{base_total / max(total, 1):.1f}x |")
    lines += [
        "",
        f"## One device: window {local['window']} (causal) at S={local['seq_len']}",
        "",
        f"Shapes B={args.batch} H={args.heads} D={args.head_dim} float32, "
        f"{info['cores']} threads; fastest of {args.iters}. torch: "
        "F.scaled_dot_product_attention with the band as a bool [S, S] mask. Max |ours - "
        f"torch| of the outputs: {local['max_abs_diff']:.1e}.",
        "",
        "| | fwd s | fwd+bwd s |",
        "|---|---|---|",
        f"| ring_attn kernel, window | {local['ours_fwd_s']:.3f} | "
        f"{local['ours_fwd_bwd_s']:.3f} |",
        f"| torch SDPA, band mask | {local['torch_fwd_s']:.3f} | "
        f"{local['torch_fwd_bwd_s']:.3f} |",
        f"| speed-up | {local['torch_fwd_s'] / local['ours_fwd_s']:.1f}x | "
        f"{local['torch_fwd_bwd_s'] / local['ours_fwd_bwd_s']:.1f}x |",
        "",
        f"Wall time of the benchmark: {wall:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--local-seq-len", type=int, default=16384)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--out-name", default="window", help="results/<name>.md and .json")
    args = p.parse_args()
    info = machine_info()
    print(f"{info['cpu']} ({info['isa']}), {info['cores']} cores, torch {info['torch']}",
          flush=True)
    load_start, t0 = info["load"], time.perf_counter()
    ring = run_ring(args)
    local = run_local(args)
    text = report(args, machine_info(), load_start, ring, local, time.perf_counter() - t0)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.out_name}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(RESULTS, f"{args.out_name}.json"), "w") as f:
        json.dump(dict(args=vars(args), machine=info, ring=ring, local=local), f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
