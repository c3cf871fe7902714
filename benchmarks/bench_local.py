"""Local (single-device) attention: ring_attn's kernels vs torch SDPA, in the same run.

CPU (default): forward and forward+backward, float32 and bfloat16, S in {1k, 4k, 16k},
D in {64, 128}, causal and not; torch's side is torch.nn.functional.
scaled_dot_product_attention (its CPU flash kernel). Also measures the machine's matmul
ceiling (a large torch.matmul in the same dtype) and reports our fraction of it.

CUDA (--device cuda): forward and backward separately, bfloat16/float16, D in {64, 128,
256}, S in {1k .. 16k}, against torch SDPA restricted to its flash and cuDNN backends;
configurations a backend rejects are reported as skipped. TFLOP/s, ref/ours per backend,
and our fraction of the GPU's bf16/fp16 matmul ceiling (8192^3 torch.matmul, same run).
--tokens N sets B = N / S per sequence length (FlashAttention's benchmarks keep B*S fixed,
so short sequences still fill the GPU). scripts/gpu_check.sh runs:
  python benchmarks/bench_local.py --device cuda --dtype bfloat16 --head-dim 64 128 \
      --seq 2048 4096 8192 16384 32768 --mode fwd bwd --tokens 32768 --iters 10 --markdown

FLOPs follow the FlashAttention convention: forward 4*B*H*Sq*Sk*D, halved when causal;
backward 2.5x forward, so forward+backward is 3.5x.

CPU instruction-set paths: every table is headed by the path our kernels take (avx2,
avx512, avx512_bf16; cpu/cpu_isa.h) and torch's CPU capability. --isa reruns the benchmark
once per named path, in a subprocess with RING_ATTN_CPU_ISA set (the path is decided once
per process); "torch-avx2" sets ATEN_CPU_CAPABILITY=avx2 (and caps oneDNN and MKL at AVX2),
so torch's kernels and ours both run AVX2 code, as on an AVX2-only CPU; "all" is every path the machine supports plus
torch-avx2 on AVX-512 machines.

Examples:
  python benchmarks/bench_local.py --quick
  python benchmarks/bench_local.py --seq 4096 --mode fwdbwd --markdown
  python benchmarks/bench_local.py --seq 4096 --mode fwdbwd --threads 2 --isa all --markdown
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import ring_attn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Row:
    mode: str
    dtype: str
    seq: int
    batch: int
    head_dim: int
    causal: bool
    ours_ms: Optional[float]
    ref_ms: Optional[float]
    ref_name: str
    flops: float
    note: str = ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def isa_line() -> str:
    """Our CPU kernels' instruction-set path, what the machine supports, and torch's."""
    isa, supported, amx = torch.ops.ring_attn._cpu_isa()
    amx_note = "detected, not implemented (runs avx512_bf16)" if amx else "no"
    return (f"ours {isa} (machine supports: {', '.join(supported)}; AMX: {amx_note}); "
            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")


def run_isa_paths(argv: list[str], names: list[str]) -> None:
    """This benchmark once per ISA path, each in its own process (see the module doc)."""
    supported = list(torch.ops.ring_attn._cpu_isa()[1])
    if names == ["all"]:
        names = supported + (["torch-avx2"] if "avx512" in supported else [])
    rest, skip = [], False
    for a in argv:  # drop --isa and its values
        if a == "--isa":
            skip = True
        elif skip and a.startswith("--"):
            skip = False
        if not skip:
            rest.append(a)
    for name in names:
        env = dict(os.environ)
        if name == "torch-avx2":
            # ATen's kernels follow ATEN_CPU_CAPABILITY; oneDNN (torch's bf16 matmuls) and
            # MKL pick their ISA themselves, so they are capped too.
            env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                       MKL_ENABLE_INSTRUCTIONS="AVX2")
            env.pop("RING_ATTN_CPU_ISA", None)
        else:
            env["RING_ATTN_CPU_ISA"] = name
        print(f"\n## {name}" + (" (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 "
                                 "MKL_ENABLE_INSTRUCTIONS=AVX2: torch and ours on AVX2)"
                                if name == "torch-avx2" else f" (RING_ATTN_CPU_ISA={name})"),
              flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), *rest], env=env, check=True)


def attn_flops(b: int, h: int, s: int, d: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * b * h * s * s * d / (2.0 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd}[mode]


def time_cpu(fn: Callable[[], None], min_time: float, max_iters: int) -> float:
    """Best wall time in ms over repeated calls (one warm-up call first)."""
    return time_cpu_pair([fn], min_time, max_iters)[0]


# --clock cpu: process CPU time instead of wall time. On a machine shared with other
# jobs (the 2-core development VM ran at load 8-12 while issue 17 was measured, and wall
# times were 5-10x the quiet ones) the CPU time a call consumes is still its own; with
# --threads 1 it has no OpenMP spin-waiting in it either.
CLOCK = time.perf_counter


def time_cpu_pair(fns: list[Callable[[], None]], min_time: float,
                  max_iters: int) -> list[float]:
    """Best time in ms (wall, or CPU with --clock cpu) of each function, calls interleaved
    (a, b, a, b, ...).

    The best (not the median) of interleaved calls: on a shared machine other processes
    only ever add time, so the minimum is the closest estimate of the uncontended cost,
    and interleaving exposes both sides to the same background load."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while len(times[0]) < max_iters and (len(times[0]) < 2
                                         or time.perf_counter() - start < min_time):
        for fn, ts in zip(fns, times):
            t0 = CLOCK()
            fn()
            ts.append((CLOCK() - t0) * 1e3)
    return [min(ts) for ts in times]


def time_cuda(fn: Callable[[], None], iters: int) -> float:
    """Median time in ms measured with CUDA events (warm-up first, synchronised)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_ceiling(dtype: torch.dtype, device: str, n: int = 2048) -> float:
    """GFLOP/s of an n x n x n torch.matmul in dtype: the machine's practical ceiling."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    if device == "cuda":
        ms = time_cuda(lambda: torch.matmul(a, b), 10)
    else:
        ms = time_cpu(lambda: torch.matmul(a, b), 1.0, 10)
    return 2.0 * n ** 3 / (ms * 1e-3) / 1e9


def make_inputs(b: int, h: int, s: int, d: int, dtype: torch.dtype, device: str,
                grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(0)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=torch.float32).to(device, dtype)
                 .requires_grad_(grad) for _ in range(3))


def cpu_step(attn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, causal: bool, mode: str) -> Callable[[], None]:
    if mode == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                attn(q, k, v, is_causal=causal)
        return fwd
    dout = torch.randn_like(q)

    def fwdbwd() -> None:
        out = attn(q, k, v, is_causal=causal)
        torch.autograd.grad(out, (q, k, v), dout)
    return fwdbwd


def run_cpu(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    rows: list[Row] = []
    ceilings = {name: matmul_ceiling(DTYPES[name], "cpu") for name in args.dtype}
    for name in args.dtype:
        dtype = DTYPES[name]
        for s in args.seq:
            for d in args.head_dim:
                for causal in args.causal:
                    for mode in args.mode:
                        q, k, v = make_inputs(args.batch, args.heads, s, d, dtype, "cpu",
                                              mode != "fwd")
                        ours, ref = time_cpu_pair(
                            [cpu_step(ring_attn.scaled_dot_product_attention, q, k, v, causal,
                                      mode),
                             cpu_step(F.scaled_dot_product_attention, q, k, v, causal, mode)],
                            args.min_time, args.iters)
                        rows.append(Row(mode, name, s, args.batch, d, causal, ours, ref,
                                        "torch",
                                        attn_flops(args.batch, args.heads, s, d, causal, mode)))
                        print_row(rows[-1], ceilings.get(name), args.markdown)
    return rows, ceilings


def run_cuda(args: argparse.Namespace) -> tuple[list[Row], dict[str, float]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    rows: list[Row] = []
    ceilings = {name: matmul_ceiling(DTYPES[name], "cuda", 8192) for name in args.dtype}
    for name in args.dtype:
        dtype = DTYPES[name]
        for s in args.seq:
            b = max(1, args.tokens // s) if args.tokens else args.batch
            for d in args.head_dim:
                for causal in args.causal:
                    for mode in args.mode:
                        q, k, v = make_inputs(b, args.heads, s, d, dtype, "cuda",
                                              mode != "fwd")
                        ours_note = ""
                        try:
                            ours = cuda_mode_ms(ring_attn.scaled_dot_product_attention, q, k, v,
                                                causal, mode, args.iters)
                        except RuntimeError as e:  # e.g. a head dim this build left out
                            ours, ours_note = None, f"ours skipped: {str(e).splitlines()[0][:60]}"
                        for bname, backend in backends.items():
                            note = ours_note
                            try:
                                with sdpa_kernel([backend]):
                                    ref = cuda_mode_ms(F.scaled_dot_product_attention, q, k, v,
                                                       causal, mode, args.iters)
                            except RuntimeError as e:  # backend rejects this config
                                ref = None
                                note = f"{bname} skipped: {str(e).splitlines()[0][:60]}"
                            rows.append(Row(mode, name, s, b, d, causal, ours, ref, bname,
                                            attn_flops(b, args.heads, s, d, causal, mode),
                                            note))
                            print_row(rows[-1], ceilings.get(name), args.markdown)
    return rows, ceilings


def cuda_mode_ms(attn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor, causal: bool, mode: str, iters: int) -> float:
    """Forward alone, or backward alone (a retained graph re-differentiated), in ms."""
    if mode == "fwd":
        def fwd() -> None:
            with torch.no_grad():
                attn(q, k, v, is_causal=causal)
        return time_cuda(fwd, iters)
    out = attn(q, k, v, is_causal=causal)
    dout = torch.randn_like(out)
    if mode == "bwd":
        return time_cuda(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                         iters)

    def fwdbwd() -> None:
        o = attn(q, k, v, is_causal=causal)
        torch.autograd.grad(o, (q, k, v), dout)
    return time_cuda(fwdbwd, iters)


def header(unit: str) -> tuple[str, ...]:
    return ("mode", "dtype", "S", "B", "D", "causal", "ours ms", "ref", "ref ms", f"ours {unit}",
            f"ref {unit}", "ref/ours", "ours % matmul")


def format_row(r: Row, ceiling: Optional[float], tflops: bool) -> list[str]:
    unit = 1e12 if tflops else 1e9

    def rate(ms: Optional[float]) -> float:
        return r.flops / (ms * 1e-3) / unit if ms else float("nan")
    ours_rate = rate(r.ours_ms)
    frac = ours_rate * unit / 1e9 / ceiling * 100 if ceiling else float("nan")
    ratio = (r.ref_ms / r.ours_ms) if (r.ref_ms and r.ours_ms) else float("nan")
    fmt = (lambda x: f"{x:.1f}") if tflops else (lambda x: f"{x:.0f}")
    return [r.mode, r.dtype, str(r.seq), str(r.batch), str(r.head_dim), "yes" if r.causal else "no",
            f"{r.ours_ms:.1f}" if r.ours_ms else "-", r.ref_name,
            f"{r.ref_ms:.1f}" if r.ref_ms else "-", fmt(ours_rate), fmt(rate(r.ref_ms)),
            f"{ratio:.2f}" if not math.isnan(ratio) else (r.note or "-"), f"{frac:.0f}%"]


_printed_header = False


def print_row(r: Row, ceiling: Optional[float], markdown: bool, tflops: bool = False) -> None:
    global _printed_header
    tflops = tflops or r.ref_name != "torch"
    cells = format_row(r, ceiling, tflops)
    head = header("TFLOP/s" if tflops else "GFLOP/s")
    if markdown:
        if not _printed_header:
            print("| " + " | ".join(head) + " |")
            print("|" + "---|" * len(head))
            _printed_header = True
        print("| " + " | ".join(cells) + " |", flush=True)
    else:
        if not _printed_header:
            print("  ".join(f"{h:>12}" for h in head))
            _printed_header = True
        print("  ".join(f"{c:>12}" for c in cells), flush=True)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help="S=1k and 4k, D=64, both dtypes")
    p.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=None)
    p.add_argument("--seq", nargs="+", type=int, default=None)
    p.add_argument("--head-dim", nargs="+", type=int, default=None)
    p.add_argument("--causal", nargs="+", choices=("yes", "no"), default=("no", "yes"))
    p.add_argument("--mode", nargs="+", choices=("fwd", "bwd", "fwdbwd"), default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=None,
                   help="CUDA: batch = tokens // S per sequence length (overrides --batch)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--iters", type=int, default=5, help="max timed calls per config")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per config (CPU)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--markdown", action="store_true", help="print a README-ready table")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU: time calls by wall clock or by process CPU time")
    p.add_argument("--isa", nargs="+", default=None,
                   help="CPU: rerun per path: avx2 avx512 avx512_bf16 torch-avx2, or all")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    a.dtype = a.dtype or (["bfloat16", "float16"] if cuda else ["float32", "bfloat16"])
    a.seq = a.seq or ([1024, 4096] if a.quick else
                      ([1024, 2048, 4096, 8192, 16384] if cuda else [1024, 4096, 16384]))
    a.head_dim = a.head_dim or ([64] if a.quick else ([64, 128, 256] if cuda else [64, 128]))
    a.mode = a.mode or (["fwd", "bwd"] if cuda else ["fwd", "fwdbwd"])
    if not cuda and "bwd" in a.mode:
        p.error("--mode bwd is CUDA only (on CPU use fwdbwd)")
    if not cuda and a.tokens:
        p.error("--tokens is CUDA only (on CPU use --batch)")
    a.causal = [c == "yes" for c in a.causal]
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time
    return a


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.isa:
        if args.device == "cuda":
            raise SystemExit("bench_local: --isa is CPU only")
        run_isa_paths(list(sys.argv[1:] if argv is None else argv), args.isa)
        return
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_local: --device cuda needs a CUDA GPU")
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"{cpu_model()}, {torch.get_num_threads()} threads, {args.clock} clock"
    print(f"# device: {device_name}")
    if args.device == "cpu":
        print(f"# isa: {isa_line()}")
    print(f"# torch {torch.__version__}, ring_attn {ring_attn.__version__}; "
          f"B={f'{args.tokens} // S' if args.tokens else args.batch}, H={args.heads}; FLOPs: fwd 4*B*H*S^2*D (/2 causal), "
          f"fwd+bwd 3.5x fwd")
    rows, ceilings = (run_cuda if args.device == "cuda" else run_cpu)(args)
    unit = "TFLOP/s" if args.device == "cuda" else "GFLOP/s"
    for name, c in ceilings.items():
        shown = c / 1e3 if args.device == "cuda" else c
        print(f"# matmul ceiling {name}: {shown:.1f} {unit} (square torch.matmul, same run)")
    for ref_name in sorted({r.ref_name for r in rows}):
        for mode in args.mode:
            ratios = [r.ref_ms / r.ours_ms for r in rows
                      if r.ref_name == ref_name and r.mode == mode and r.ref_ms and r.ours_ms]
            if ratios:
                geo = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
                print(f"# {mode} ref/ours vs {ref_name}: geometric mean {geo:.2f}, min "
                      f"{min(ratios):.2f}, max {max(ratios):.2f} over {len(ratios)} configs")


if __name__ == "__main__":
    main()
