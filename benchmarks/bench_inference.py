"""Long-context inference on CPU (gloo): pass-KV vs pass-Q prefill at P = 4, the strategy
"auto" picks, and decode step time vs cache length at P = 1, 2, 4.

    python benchmarks/bench_inference.py            # writes benchmarks/results/inference.{md,json}
    python benchmarks/bench_inference.py --cached 0,1024 --new 64 --decode-lens 1024 --no-write

Spawns 4 gloo processes (FileStore, 1 torch thread each). Prefill: for every (cached
tokens T, new tokens N) of the grid and each KV-head count, a cache of T random tokens is
filled (untimed, through the cache's own placement), then one ring_prefill of a chunk of
N tokens runs with strategy "pass_kv" and with "pass_q" (alternating, --iters times each);
the time of a call is its slowest rank's wall time, the best of the --iters is reported, with the bytes this
rank sent (comm.record_traffic, the most over ranks). Each run's prefill rows are
appended to results/inference_runs.jsonl and the strategies are also ranked by the
geometric mean of pass-KV / pass-Q over every stored run: on a shared machine a single
run's ranking flips where the two are within its noise. "auto" is
ring_attn.inference.choose_strategy on the same sizes; it "picks the faster" when its
choice had the lower time, and auto/best is its choice's time over the faster one's.
Decode: ring_decode of one token per step on a cache of L tokens, the mean over
--decode-steps steps (slowest rank), and the cache's bytes per rank (memory_bytes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_hybrid import machine  # noqa: E402
from ring_attn.comm import record_traffic  # noqa: E402
from ring_attn.inference import (ShardedKVCache, choose_strategy, chunk_positions,  # noqa: E402
                                 placement, ring_decode, ring_prefill)

RESULTS = os.path.join(HERE, "results")
P = 4
STRATEGIES = ("pass_kv", "pass_q")


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def filled_cache(t: int, a, group, g: torch.Generator) -> ShardedKVCache:
    """A cache holding T random tokens, placed as one prefill chunk would place them."""
    cache = ShardedKVCache(1, 1, a.kv, a.dim, dtype=a.torch_dtype, group=group)
    if t:
        takes = placement(cache.counts(), t)
        n = takes[cache.rank]
        kv = [torch.randn(1, a.kv, n, a.dim, generator=g).to(a.torch_dtype) for _ in "kv"]
        cache.append(0, *kv, chunk_positions(takes, cache.rank, 0), takes)
    return cache


def slowest(x: float, group=None) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def prefill_point(t: int, n: int, a, g) -> dict:
    """Both strategies, alternating call by call (kv, q, kv, q, ...), so a burst of load
    from other processes on a shared machine hits both alike."""
    best = {s: float("inf") for s in STRATEGIES}
    sent = {s: 0 for s in STRATEGIES}
    for _ in range(a.iters):
        for strategy in STRATEGIES:
            cache = filled_cache(t, a, None, g)
            pos = cache.prefill_positions(n)
            q = torch.randn(1, a.heads, pos.numel(), a.dim, generator=g).to(a.torch_dtype)
            k, v = (torch.randn(1, a.kv, pos.numel(), a.dim, generator=g).to(a.torch_dtype)
                    for _ in "kv")
            dist.barrier()
            with record_traffic() as tr:
                t0 = time.perf_counter()
                ring_prefill(q, k, v, cache, strategy=strategy)
                dt = time.perf_counter() - t0
            best[strategy] = min(best[strategy], slowest(dt))
            sent[strategy] = max(sent[strategy], int(slowest(tr.bytes)))
    return {f"{s}_{key}": val for s in STRATEGIES
            for key, val in (("ms", best[s] * 1e3), ("bytes", sent[s]))}


def decode_point(length: int, p: int, group, a, g) -> dict:
    cache = filled_cache(length, a, group, g)
    q = torch.randn(1, a.heads, 1, a.dim, generator=torch.Generator().manual_seed(length))
    k = torch.randn(1, a.kv, 1, a.dim, generator=torch.Generator().manual_seed(length + 1))
    q, k = q.to(a.torch_dtype), k.to(a.torch_dtype)
    ring_decode(q, k, k, cache, group=group)  # warm-up
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(a.decode_steps):
        ring_decode(q, k, k, cache, group=group)
    dt = (time.perf_counter() - t0) / a.decode_steps
    return {"ms": slowest(dt, group) * 1e3, "cache_bytes_per_rank": cache.memory_bytes(),
            "cache_tokens_per_rank": cache.local_length()}


def worker(rank: int, a, store_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store_path, P), rank=rank,
                            world_size=P, timeout=datetime.timedelta(seconds=600))
    a.torch_dtype = getattr(torch, a.dtype)
    g = torch.Generator().manual_seed(rank)
    rows = []
    with torch.inference_mode():
        for kv in a.kv_heads:
            a.kv = kv
            for t in a.cached:
                for n in a.new:
                    res = prefill_point(t, n, a, g)
                    auto = choose_strategy(n, t, a.heads, kv, a.dim, a.dim, a.torch_dtype, P, 1)
                    rows.append({"kind": "prefill", "Hq": a.heads, "Hk": kv, "T": t, "N": n,
                                 **res, "auto": auto})
                    if rank == 0:
                        print(rows[-1], flush=True)
        a.kv = a.kv_heads[-1]
        for p in (1, 2, 4):
            group = dist.new_group(list(range(p)))
            for length in a.decode_lens:
                if rank < p:
                    res = decode_point(length, p, group, a, g)
                    if rank == 0:
                        rows.append({"kind": "decode", "P": p, "L": length, "Hq": a.heads,
                                     "Hk": a.kv, **res})
                        print(rows[-1], flush=True)
                dist.barrier()
    if rank == 0 and not a.no_write:
        write(rows, a)
    dist.barrier()
    dist.destroy_process_group()


def write(rows: list[dict], a) -> None:
    mib = 2 ** 20
    pre = [r for r in rows if r["kind"] == "prefill"]
    lines = [f"# Inference on CPU (gloo), P = {P}", "", f"Machine: {machine()}", "",
             f"Command: `python benchmarks/bench_inference.py {' '.join(sys.argv[1:])}`",
             f"(B = 1, Hq = {a.heads}, D = Dv = {a.dim}, {a.dtype}, best of {a.iters}; "
             "time = slowest rank's wall time of one ring_prefill)", "",
             "## Prefill: pass-KV vs pass-Q", "",
             "| Hq:Hk | cached T | new N | pass-KV ms | pass-Q ms | pass-KV MiB sent/rank | "
             "pass-Q MiB sent/rank | faster | auto | auto / best |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    hits, worst = 0, 1.0
    for r in pre:
        faster = "pass_kv" if r["pass_kv_ms"] <= r["pass_q_ms"] else "pass_q"
        ratio = r[f"{r['auto']}_ms"] / min(r["pass_kv_ms"], r["pass_q_ms"])
        hits += r["auto"] == faster
        worst = max(worst, ratio)
        r["faster"], r["auto_over_best"] = faster, ratio
        lines.append(f"| {r['Hq']}:{r['Hk']} | {r['T']} | {r['N']} | {r['pass_kv_ms']:.1f} | "
                     f"{r['pass_q_ms']:.1f} | {r['pass_kv_bytes'] / mib:.2f} | "
                     f"{r['pass_q_bytes'] / mib:.2f} | {faster} | {r['auto']} | {ratio:.3f} |")
    within = sum(r["auto_over_best"] <= 1.02 for r in pre)
    lines += ["", f"auto picked the faster strategy at {hits} of {len(pre)} points "
              f"({100 * hits / max(len(pre), 1):.0f}%); within 2% of the faster at {within} of "
              f"{len(pre)}; worst auto / best = {worst:.3f}.", ""]
    lines += pooled(pre, a)
    lines += ["## Decode: one token per step", "",
              "| cache tokens L | P | ms / step | cache tokens per rank | cache MiB per rank |",
              "|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "decode"):
        lines.append(f"| {r['L']} | {r['P']} | {r['ms']:.2f} | {r['cache_tokens_per_rank']} | "
                     f"{r['cache_bytes_per_rank'] / mib:.2f} |")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "inference.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, "inference.json"), "w") as f:
        json.dump({"machine": machine(), "args": vars(a) | {"torch_dtype": a.dtype},
                   "rows": rows}, f, indent=1)
    print("\n".join(lines))


def pooled(pre: list[dict], a) -> list[str]:
    """Append this run's prefill rows to inference_runs.jsonl and rank the strategies by
    the geometric mean of pass-KV / pass-Q time over every run stored there (same grid):
    on a shared machine one run's ranking flips where the two are within its noise."""
    path = os.path.join(RESULTS, "inference_runs.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps({"machine": machine(), "rows": pre}) + "\n")
    runs = [json.loads(line)["rows"] for line in open(path)]
    ratios: dict = {}
    for rows in runs:
        for r in rows:
            ratios.setdefault((r["Hk"], r["T"], r["N"]), []).append(r["pass_kv_ms"] /
                                                                   r["pass_q_ms"])
    lines = [f"### Pooled over the {len(runs)} runs in inference_runs.jsonl", "",
             "| Hq:Hk | cached T | new N | pass-KV / pass-Q per run | geometric mean | "
             "faster | auto | auto / best |", "|---|---|---|---|---|---|---|---|"]
    hits, worst = 0, 1.0
    for (hk, t, n), rs in sorted(ratios.items(), key=lambda kv: (-kv[0][0], kv[0][1:])):
        g = math.exp(sum(math.log(x) for x in rs) / len(rs))
        faster = "pass_q" if g > 1 else "pass_kv"
        auto = choose_strategy(n, t, a.heads, hk, a.dim, a.dim, a.torch_dtype, P, 1)
        ratio = 1.0 if auto == faster else (g if auto == "pass_kv" else 1 / g)
        hits += auto == faster
        worst = max(worst, ratio)
        lines.append(f"| {a.heads}:{hk} | {t} | {n} | {' / '.join(f'{x:.2f}' for x in rs)} | "
                     f"{g:.2f} | {faster} | {auto} | {ratio:.3f} |")
    return lines + ["", f"Pooled: auto picked the faster strategy at {hits} of {len(ratios)} "
                    f"points; worst auto / best = {worst:.3f}.", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cached", type=_ints, default=_ints("0,256,1024,4096,16384"))
    ap.add_argument("--new", type=_ints, default=_ints("64,256,1024"))
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=_ints, default=_ints("8,2"))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=9)
    ap.add_argument("--decode-lens", type=_ints, default=_ints("1024,4096,16384,65536"))
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(a, os.path.join(tmp, "store")), nprocs=P, join=True)


if __name__ == "__main__":
    main()
