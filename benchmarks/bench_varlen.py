"""Packed variable-length documents on CPU: ring_attn.varlen_attention vs two ways to do the
same with torch, in the same run, plus the tile and ring-balance figures behind them.

For each document mix of issue 10 (ring_attn.packing.example_mixes, S tokens, drawn for
P = 4): uniform lengths 512..4096, long-tailed (one document of S/2 among many short ones),
1-token documents, one document longer than S/P. Causal, forward, B=1, H heads:

  ours   varlen_attention(q, k, v, cu, cu, is_causal=True): one kernel call, documents
         from cu_seqlens, tiles across documents skipped.
  mask   torch.nn.functional.scaled_dot_product_attention on the whole pack with the
         explicit block-diagonal causal bool mask [S, S] (built outside the timing).
         One timed call, no warm-up: at S = 16k it computes all S^2 scores (~20 s).
  loop   a Python loop of torch SDPA (is_causal=True) over the documents.

Times: best wall time of interleaved calls (bench_local.time_cpu_pair: one warm-up, then
calls alternating between ours and loop), so background load hits both alike; ratios
> 1 mean ours is faster. `max|ours-loop|` checks that both computed the same thing.

Tiles: the fraction of the forward kernel's 64 x 512 (query x key) tiles that are
skipped (no document in common or all in the future), full (one document, all visible)
or partial (masked element-wise), computed in Python from the rule of
csrc/common/visibility.h (classify_tile) on each tile's position and document min/max.

Balance (the schedule, exact pair counts, ring_attn.packing.balance): per-rank causal
pairs max/min at P = 4 for the contiguous layout and the packed balanced layout, and the
step factor (sum over ring steps of the slowest rank's pairs over the ideal).

Example:
  python benchmarks/bench_varlen.py --out benchmarks/results/cpu_varlen.md
  python benchmarks/bench_varlen.py --seq 4096 --head-dim 64 --dtype float32   # quick
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # bench_local's timing and machine helpers
try:
    import ring_attn
except ImportError:  # a source checkout without `pip install -e .`: use the tree's package
    sys.path.insert(0, os.path.dirname(HERE))
    import ring_attn
from bench_local import cpu_model, time_cpu_pair  # noqa: E402
from ring_attn.packing import balance, example_mixes  # noqa: E402
from ring_attn.varlen import varlen_attention  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tile_fractions(cu: tuple[int, ...], q_block: int = 64, k_block: int = 512,
                   is_causal: bool = True) -> tuple[float, float, float]:
    """(skipped, full, partial) fractions of the [S/q_block] x [S/k_block] tiles, by
    visibility.h's classify_tile on contiguous positions 0..S-1 and their documents."""
    s = cu[-1]
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())

    def spans(block: int) -> tuple[torch.Tensor, ...]:
        starts = torch.arange(0, s, block)
        ends = torch.clamp(starts + block, max=s) - 1  # inclusive
        return starts, ends, doc[starts], doc[ends]  # documents are monotone in position

    qlo, qhi, qdlo, qdhi = (t[:, None] for t in spans(q_block))
    klo, khi, kdlo, kdhi = (t[None, :] for t in spans(k_block))
    skip = (kdlo > qdhi) | (kdhi < qdlo)
    full = (qdlo == qdhi) & (kdlo == kdhi) & (qdlo == kdlo)
    if is_causal:
        skip = skip | (klo > qhi)
        full = full & (khi <= qlo)
    full = full & ~skip
    n = skip.numel()
    return (float(skip.sum()) / n, float(full.sum()) / n,
            float((~skip & ~full).sum()) / n)


def block_diagonal_causal(cu: tuple[int, ...]) -> torch.Tensor:
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu).diff())
    return (doc[:, None] == doc[None, :]).tril_()


def run(args: argparse.Namespace) -> list[str]:
    lines: list[str] = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    s, h, p = args.seq, args.heads, args.world_size
    mixes = example_mixes(s, p, seed=0)
    load0 = os.getloadavg()
    emit(f"# device: {cpu_model()}, {torch.get_num_threads()} threads; torch "
         f"{torch.__version__}, Python {platform.python_version()}, ring_attn "
         f"{ring_attn.__version__}; {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC; load "
         f"average at the start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    emit(f"# command: python benchmarks/bench_varlen.py {' '.join(sys.argv[1:])}")
    emit(f"# S={s} packed, B=1, H={h}, causal, forward; mixes drawn for P={p} (seed 0)")
    emit("")
    emit("## Documents, tiles and schedule balance")
    emit("")
    emit(f"| mix | docs | longest | fwd tiles skipped | full | partial | contiguous "
         f"max/min (P={p}) | packed max/min | contiguous step factor | packed step factor |")
    emit("|---|---|---|---|---|---|---|---|---|---|")
    for name, cu in mixes.items():
        sk, fu, pa = tile_fractions(cu)
        bc, bp = balance(cu, p, "contiguous"), balance(cu, p, "packed")
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        emit(f"| {name} | {len(cu) - 1} | {longest} | {sk:.1%} | {fu:.1%} | {pa:.1%} | "
             f"{bc.imbalance:.3f} | {bp.imbalance:.4f} | {bc.step_factor:.3f} | "
             f"{bp.step_factor:.4f} |")
    emit("")
    emit("## Forward time (ms), ours vs torch")
    emit("")
    emit("| mix | dtype | D | ours ms | mask ms | loop ms | mask/ours | loop/ours | "
         "max abs(ours-loop) |")
    emit("|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for name, cu in mixes.items():
        cu_t = torch.tensor(cu, dtype=torch.int32)
        mask = None if args.skip_mask else block_diagonal_causal(cu)
        for dtype_name in args.dtype:
            for d in args.head_dim:
                dtype = DTYPES[dtype_name]
                q, k, v = (torch.randn(s, h, d, generator=g).to(dtype) for _ in range(3))
                q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v))
                box: dict[str, torch.Tensor] = {}

                def ours() -> None:
                    box["ours"] = varlen_attention(q, k, v, cu_t, cu_t, is_causal=True)

                def loop() -> None:
                    box["loop"] = torch.cat([
                        F.scaled_dot_product_attention(q4[:, :, a:b], k4[:, :, a:b],
                                                       v4[:, :, a:b], is_causal=True)
                        for a, b in zip(cu, cu[1:]) if b > a], dim=2)

                with torch.no_grad():
                    t_ours, t_loop = time_cpu_pair([ours, loop], args.min_time, args.iters)
                    t_mask: Optional[float] = None
                    if mask is not None:
                        t0 = time.perf_counter()
                        F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask)
                        t_mask = (time.perf_counter() - t0) * 1e3
                diff = (box["ours"].float() - box["loop"][0].transpose(0, 1).float()).abs().max()
                mask_ms = "-" if t_mask is None else f"{t_mask:.0f}"
                mask_ratio = "-" if t_mask is None else f"{t_mask / t_ours:.1f}"
                emit(f"| {name} | {dtype_name} | {d} | {t_ours:.1f} | {mask_ms} | "
                     f"{t_loop:.1f} | {mask_ratio} | {t_loop / t_ours:.2f} | "
                     f"{float(diff):.1e} |")
    load1 = os.getloadavg()
    emit("")
    emit(f"# load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    return lines


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=16384, help="packed tokens S")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    ap.add_argument("--dtype", nargs="+", choices=tuple(DTYPES),
                    default=["float32", "bfloat16"])
    ap.add_argument("--world-size", type=int, default=4,
                    help="P for the mixes' long document and the balance figures")
    ap.add_argument("--iters", type=int, default=3, help="max timed calls (ours, loop)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds per config")
    ap.add_argument("--skip-mask", action="store_true",
                    help="leave out the S x S block-diagonal mask (slow at 16k)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--out", default=None, help="also write the output to this file")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = run(args)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# CPU: packed variable-length documents (varlen_attention)\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
