"""Long-context inference on CPU (gloo): pass-KV vs pass-Q prefill at P = 4, the strategy
"auto" picks, and decode step time vs cache length at P = 1, 2, 4.

    python benchmarks/bench_inference.py            # writes benchmarks/results/inference.{md,json}
    python benchmarks/bench_inference.py --dtype bfloat16   # ... inference_bfloat16.{md,json}
    python benchmarks/bench_inference.py --cached 0,1024 --new 64 --decode-lens 1024 --no-write
    python benchmarks/bench_inference.py --refit    # auto's constants vs the stored runs

Spawns 4 gloo processes (FileStore, 1 torch thread each). Prefill: for every (cached
tokens T, new tokens N) of the grid and each KV-head count, one SAMPLE is a chunk of N
tokens prefilled through every layer of a --layers-layer cache holding T random tokens
(filled untimed, through the cache's own placement): what a model's forward runs, and long
enough that one descheduling of one of the 4 ranks sharing 2 cores does not decide it. Its
time is the slowest rank's wall time over the layers, reported per layer. Samples come in
PAIRS, one per strategy, their order alternating pair by pair, so a burst of load hits both
alike; pairs are drawn until the sign test on "pass-KV slower in the pair" separates the
two (two-sided p < 0.05, at least --min-pairs) or --max-pairs are in. The strategy faster
in the median pair (median of pass-KV / pass-Q) is "faster"; "resolved" when the sign test
separated them, a tie otherwise (the test is checked after every pair, so its p is
nominal: stopping at the first p < 0.05 calls a true tie resolved more often than 5%).
Bytes: what this rank sent per layer (comm.record_traffic, the most over ranks). Each
run's prefill rows (with every pair's ratio) are appended to results/inference_runs.jsonl
and pooled with the stored runs of the same method and shape. "auto" is
ring_attn.inference.choose_strategy on the same sizes; auto / best is the median paired
ratio of its choice over the other where its choice is slower.
Decode: ring_decode of one token per step on a cache of L tokens, the mean over
--decode-steps steps (slowest rank), and the cache's bytes per rank (memory_bytes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
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


def filled_cache(t: int, a, group, g: torch.Generator, layers: int = 1) -> ShardedKVCache:
    """A cache of `layers` layers holding T random tokens each, placed as one prefill
    chunk would place them."""
    cache = ShardedKVCache(layers, 1, a.kv, a.dim, dtype=a.torch_dtype, group=group)
    if t:
        takes = placement(cache.counts(), t)
        n = takes[cache.rank]
        for layer in range(layers):
            kv = [torch.randn(1, a.kv, n, a.dim, generator=g).to(a.torch_dtype) for _ in "kv"]
            cache.append(layer, *kv, chunk_positions(takes, cache.rank, 0), takes)
    return cache


def slowest(x: float, group=None) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t)


def sign_test(wins: int, n: int) -> float:
    """Two-sided p of `wins` successes in n fair coin flips."""
    k = min(wins, n - wins)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def sample(strategy: str, t: int, n: int, a, g) -> tuple[float, int]:
    """Seconds (slowest rank) and bytes this rank sent (most over ranks) per layer for a
    chunk of n tokens prefilled through every layer of a cache holding t tokens."""
    cache = filled_cache(t, a, None, g, a.layers)
    pos = cache.prefill_positions(n)
    q = torch.randn(1, a.heads, pos.numel(), a.dim, generator=g).to(a.torch_dtype)
    k, v = (torch.randn(1, a.kv, pos.numel(), a.dim, generator=g).to(a.torch_dtype)
            for _ in "kv")
    dist.barrier()
    with record_traffic() as tr:
        t0 = time.perf_counter()
        for layer in range(a.layers):
            ring_prefill(q, k, v, cache, layer=layer, strategy=strategy)
        dt = time.perf_counter() - t0
    return slowest(dt) / a.layers, int(slowest(tr.bytes)) // a.layers


def prefill_point(t: int, n: int, a, g) -> dict:
    """Pairs (pass-KV, pass-Q samples, the order alternating) until the sign test separates
    them or --max-pairs; every rank sees the same (all-reduced) times, so every rank draws
    the same number of pairs."""
    ms = {s: [] for s in STRATEGIES}
    sent = {}
    while len(ms["pass_q"]) < a.max_pairs:
        order = STRATEGIES if len(ms["pass_q"]) % 2 == 0 else STRATEGIES[::-1]
        for strategy in order:
            dt, sent[strategy] = sample(strategy, t, n, a, g)
            ms[strategy].append(dt * 1e3)
        pairs = len(ms["pass_q"])
        kv_slower = sum(x > y for x, y in zip(ms["pass_kv"], ms["pass_q"]))
        if pairs >= a.min_pairs and sign_test(kv_slower, pairs) < 0.05:
            break
    ratios = [x / y for x, y in zip(ms["pass_kv"], ms["pass_q"])]
    return {**{f"{s}_ms": statistics.median(ms[s]) for s in STRATEGIES},
            **{f"{s}_bytes": sent[s] for s in STRATEGIES},
            "ratios": [round(r, 4) for r in ratios], "kv_slower": kv_slower}


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


METHOD = "paired-layers"  # runs stored before (best of 9 single calls) are not pooled


def verdict(ratios: list[float], auto: str) -> dict:
    """From one point's pass-KV / pass-Q pair ratios: the faster (median pair), whether the
    sign test resolved it, and auto's median time over the other's where auto is slower."""
    ratio = statistics.median(ratios)
    faster = "pass_q" if ratio > 1 else "pass_kv"
    p = sign_test(sum(r > 1 for r in ratios), len(ratios))
    over = 1.0 if auto == faster else (ratio if auto == "pass_kv" else 1 / ratio)
    return {"ratio": ratio, "faster": faster, "p": p, "resolved": p < 0.05,
            "auto_over_best": over}


def summary(points: list[dict], what: str) -> str:
    hits = sum(r["auto"] == r["faster"] for r in points)
    res = [r for r in points if r["resolved"]]
    res_hits = sum(r["auto"] == r["faster"] for r in res)
    worst = max(r["auto_over_best"] for r in points)
    return (f"{what}: auto picked the faster strategy (median pair) at {hits} of {len(points)} "
            f"points ({100 * hits / len(points):.0f}%); at the {len(res)} points the sign "
            f"test resolves (p < 0.05) at {res_hits} of {len(res)}; worst auto / best = "
            f"{worst:.3f}.")


def write(rows: list[dict], a) -> None:
    mib = 2 ** 20
    pre = [r for r in rows if r["kind"] == "prefill"]
    lines = [f"# Inference on CPU (gloo), P = {P}", "", f"Machine: {machine()}", "",
             f"Command: `python benchmarks/bench_inference.py {' '.join(sys.argv[1:])}`",
             f"(B = 1, Hq = {a.heads}, D = Dv = {a.dim}, {a.dtype}; a sample = one chunk "
             f"through {a.layers} layers, time per layer = slowest rank's wall time / "
             f"{a.layers}; {a.min_pairs}-{a.max_pairs} pairs per point, medians)", "",
             "## Prefill: pass-KV vs pass-Q", "",
             "| Hq:Hk | cached T | new N | pass-KV ms | pass-Q ms | MiB sent/rank KV / Q | "
             "pass-KV / pass-Q (median pair) | pairs | sign test p | faster | auto | "
             "auto / best |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in pre:
        r.update(verdict(r["ratios"], r["auto"]))
        lines.append(f"| {r['Hq']}:{r['Hk']} | {r['T']} | {r['N']} | {r['pass_kv_ms']:.1f} | "
                     f"{r['pass_q_ms']:.1f} | {r['pass_kv_bytes'] / mib:.2f} / "
                     f"{r['pass_q_bytes'] / mib:.2f} | {r['ratio']:.3f} | {len(r['ratios'])} | "
                     f"{r['p']:.3f} | {r['faster'] if r['resolved'] else 'tie'} | {r['auto']} | "
                     f"{r['auto_over_best']:.3f} |")
    lines += ["", summary(pre, "This run"), ""]
    lines += pooled(pre, a)
    lines += ["## Decode: one token per step", "",
              "| cache tokens L | P | ms / step | cache tokens per rank | cache MiB per rank |",
              "|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "decode"):
        lines.append(f"| {r['L']} | {r['P']} | {r['ms']:.2f} | {r['cache_tokens_per_rank']} | "
                     f"{r['cache_bytes_per_rank'] / mib:.2f} |")
    os.makedirs(RESULTS, exist_ok=True)
    name = "inference" if a.dtype == "float32" else f"inference_{a.dtype}"
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump({"machine": machine(), "args": vars(a) | {"torch_dtype": a.dtype},
                   "rows": rows}, f, indent=1)
    print("\n".join(lines))


RUNS = os.path.join(RESULTS, "inference_runs.jsonl")


def stored_pairs(a) -> tuple[int, dict]:
    """Every stored run of this method and shape: (runs, {(Hk, T, N): all pair ratios})."""
    runs = [json.loads(line) for line in open(RUNS)] if os.path.exists(RUNS) else []
    runs = [r for r in runs if r.get("method") == METHOD and r.get("shape") == shape(a)]
    pairs: dict = {}
    for run in runs:
        for r in run["rows"]:
            pairs.setdefault((r["Hk"], r["T"], r["N"]), []).extend(r["ratios"])
    return len(runs), pairs


def shape(a) -> list:
    return [a.heads, a.dim, a.dtype, a.layers]


def pooled(pre: list[dict], a) -> list[str]:
    """Append this run's prefill rows to inference_runs.jsonl and judge auto on every pair
    of every stored run of the same method and shape, pooled per point: on a shared
    machine one run's verdict flips where the two are within its noise."""
    with open(RUNS, "a") as f:
        f.write(json.dumps({"machine": machine(), "method": METHOD, "shape": shape(a),
                            "rows": pre}) + "\n")
    n_runs, pairs = stored_pairs(a)
    lines = [f"### Pooled over the {n_runs} runs of this method in inference_runs.jsonl", "",
             "| Hq:Hk | cached T | new N | pairs | pass-KV / pass-Q (median pair) | "
             "sign test p | faster | auto | auto / best |", "|---|---|---|---|---|---|---|---|---|"]
    points = []
    for (hk, t, n), ratios in sorted(pairs.items(), key=lambda kv: (-kv[0][0], kv[0][1:])):
        auto = choose_strategy(n, t, a.heads, hk, a.dim, a.dim, a.torch_dtype, P, 1)
        r = {"auto": auto, **verdict(ratios, auto)}
        points.append(r)
        lines.append(f"| {a.heads}:{hk} | {t} | {n} | {len(ratios)} | {r['ratio']:.3f} | "
                     f"{r['p']:.3f} | {r['faster'] if r['resolved'] else 'tie'} | {auto} | "
                     f"{r['auto_over_best']:.3f} |")
    return lines + ["", summary(points, "Pooled"), ""]


def refit(a) -> None:
    """auto's constant (pass-Q's exposed round, MiB) against the pooled stored pairs: for
    each candidate, the points where it picks the median-pair faster one, and its worst
    auto / best. Prints the table; choosing is left to the reader."""
    n_runs, pairs = stored_pairs(a)
    print(f"{n_runs} stored runs of method {METHOD}, shape {shape(a)}")
    if not pairs:
        return
    for mib in (0, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 4):
        points = []
        for (hk, t, n), ratios in pairs.items():
            auto = choose_strategy(n, t, a.heads, hk, a.dim, a.dim, a.torch_dtype, P, 1,
                                   exposed_round_bytes=int(mib * 2 ** 20))
            points.append({"auto": auto, **verdict(ratios, auto)})
        hits = sum(r["auto"] == r["faster"] for r in points)
        worst = max(r["auto_over_best"] for r in points)
        print(f"round {mib:5.2f} MiB: {hits:2d} of {len(points)}, worst {worst:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cached", type=_ints, default=_ints("0,256,1024,4096,16384"))
    ap.add_argument("--new", type=_ints, default=_ints("64,256,1024"))
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=_ints, default=_ints("8,2"))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--min-pairs", type=int, default=7)
    ap.add_argument("--max-pairs", type=int, default=25)
    ap.add_argument("--decode-lens", type=_ints, default=_ints("1024,4096,16384,65536"))
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--refit", action="store_true")
    a = ap.parse_args()
    if a.refit:
        a.torch_dtype = getattr(torch, a.dtype)
        return refit(a)
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(a, os.path.join(tmp, "store")), nprocs=P, join=True)


if __name__ == "__main__":
    main()
