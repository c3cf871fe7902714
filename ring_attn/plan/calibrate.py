"""Calibration: measure this machine's kernel throughput and ring link, write a preset.

    python -m ring_attn.plan --calibrate [--out preset.json] [--sizes 1024 2048 4096]

Kernel: ring_attn's own attn_fwd / attn_bwd (the ops every ring step calls, with the
ring's float32 partials) on one non-causal block [1, H, S, D] x [1, H, S, D] in the
given dtype, timed as the best of `repeats` calls, once with all of torch's threads and
once with one thread (P ranks on one host run max(1, cores // P) threads each). FLOP/s
counts 4*S^2*D*H forward and 10*S^2*D*H backward (model.flops_per_pair).

Link: 2 local processes over gloo (the backend the CPU ring uses) send a buffer back and
forth; one-way time = round trip / 2, fitted as latency + bytes / bandwidth by least
squares over the sizes (4 KiB to `max_link_mib`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import tempfile
import time
from typing import Any, Optional

import torch

from .model import Shape, flops_per_pair

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: thread pool, scratch, first touch
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def kernel_throughput(s: int, heads: int = 8, head_dim: int = 64, dtype: str = "float32",
                      repeats: int = 3) -> dict[str, float]:
    """FLOP/s of one forward and one backward kernel call on an S x S block, whole and
    causal (the ring's diagonal step; FLOPs over its S(S+1)/2 visible pairs)."""
    from .. import ops
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, heads, s, head_dim, generator=g).to(dt) for _ in range(4))
    scale = head_dim ** -0.5
    sh = Shape(heads, heads, head_dim)
    res: dict[str, float] = {"S": s}
    for causal, pre, pairs in ((False, "", float(s) * s), (True, "causal_", s * (s + 1) / 2)):
        out, lse = ops.attn_fwd(q, k, v, is_causal=causal, scale=scale, out_fp32=True)
        fwd = _best(lambda: ops.attn_fwd(q, k, v, is_causal=causal, scale=scale,
                                         out_fp32=True), repeats)
        bwd = _best(lambda: ops.attn_bwd(dout, q, k, v, out.to(dt), lse, is_causal=causal,
                                         scale=scale, grad_fp32=True), repeats)
        res.update({f"{pre}fwd_s": fwd, f"{pre}bwd_s": bwd,
                    f"{pre}fwd_flops": pairs * flops_per_pair(sh, "fwd") / fwd,
                    f"{pre}bwd_flops": pairs * flops_per_pair(sh, "bwd") / bwd})
    return res


def _link_worker(rank: int, store_path: str, sizes: list[int], repeats: int,
                 out_path: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    rows = []
    for n in sizes:
        buf = torch.zeros(n // 4, dtype=torch.float32)
        times = []
        for it in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            else:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if it:  # the first round trip sets up the pair: not timed
                times.append((time.perf_counter() - t0) / 2)
        rows.append({"bytes": n, "one_way_s": min(times)})
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.barrier()
    dist.destroy_process_group()


def link(max_link_mib: int = 64, repeats: int = 5) -> dict[str, Any]:
    """Latency and bandwidth of gloo between 2 local processes."""
    import torch.multiprocessing as mp
    sizes = [4096]
    while sizes[-1] < max_link_mib * 2 ** 20:
        sizes.append(sizes[-1] * 4)
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "link.json")
        mp.start_processes(_link_worker, args=(os.path.join(tmp, "store"), sizes, repeats,
                                               out_path), nprocs=2, start_method="spawn")
        with open(out_path) as f:
            rows = json.load(f)
    latency, bandwidth = fit_latency_bandwidth([r["bytes"] for r in rows],
                                               [r["one_way_s"] for r in rows])
    return {"rows": rows, "latency": latency, "bandwidth": bandwidth}


def fit_latency_bandwidth(nbytes: list[float], seconds: list[float]) -> tuple[float, float]:
    """Least squares t = latency + bytes / bandwidth in RELATIVE error (weights 1/t^2), so
    the small messages fix the latency and the large ones the bandwidth; latency >= 0."""
    w = [1.0 / (y * y) for y in seconds]
    sw = sum(w)
    mx = sum(wi * x for wi, x in zip(w, nbytes)) / sw
    my = sum(wi * y for wi, y in zip(w, seconds)) / sw
    sxx = sum(wi * (x - mx) ** 2 for wi, x in zip(w, nbytes))
    slope = sum(wi * (x - mx) * (y - my) for wi, x, y in zip(w, nbytes, seconds)) / sxx
    latency = max(0.0, my - slope * mx)
    return latency, 1.0 / slope


def machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def calibrate(sizes: Optional[list[int]] = None, out: Optional[str] = None,
              heads: int = 8, head_dim: int = 64, dtype: str = "float32",
              max_link_mib: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Measure, and write the preset JSON to `out` (when given). The device's FLOP/s is
    the largest size's (the ring runs large blocks); every size is kept in "kernel"."""
    sizes = sizes or [1024, 2048, 4096]
    threads = torch.get_num_threads()
    cores = os.cpu_count() or 1
    kernel, single = [], []
    try:
        for s in sizes:
            kernel.append(kernel_throughput(s, heads, head_dim, dtype, repeats))
        torch.set_num_threads(1)
        for s in sizes:
            single.append(kernel_throughput(s, heads, head_dim, dtype, repeats))
    finally:
        torch.set_num_threads(threads)
    ln = link(max_link_mib)
    top, one = kernel[-1], single[-1]
    rec = {
        "machine": machine(),
        "config": {"heads": heads, "head_dim": head_dim, "dtype": dtype, "threads": threads},
        "device": {"name": f"this CPU ({cores} cores, calibrated)", "flops": top["fwd_flops"],
                   "flops_bwd": top["bwd_flops"], "memory": _memory_bytes(),
                   "efficiency": 1.0, "cores": cores, "core_flops": one["fwd_flops"],
                   "core_flops_bwd": one["bwd_flops"],
                   "table": [table_row(a, b) for a, b in zip(kernel, single)]},
        "fabric": {"name": "gloo loopback (calibrated)", "bandwidth": ln["bandwidth"],
                   "latency": ln["latency"], "shared_host": True},
        "kernel": kernel, "kernel_1thread": single, "link": ln["rows"],
    }
    if out:
        with open(out, "w") as f:
            json.dump(rec, f, indent=1)
    return rec


def table_row(all_threads: dict[str, float], one: dict[str, float]) -> dict[str, float]:
    """A Device.table row from kernel_throughput at all threads and at one thread."""
    row = {"S": all_threads["S"]}
    for pre, key in (("", ""), ("c", "causal_")):
        for ph in ("fwd", "bwd"):
            row[pre + ph] = all_threads[f"{key}{ph}_flops"]
            row[pre + ph + "1"] = one[f"{key}{ph}_flops"]
    return row


def _memory_bytes() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0
