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

Tiles: the fraction of the forward kernel's 64 x 128 (query x key) tiles (its block with
documents, csrc/cpu/attention_fwd.cpp) that are
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
from ring_attn import ops  # noqa: E402
from ring_attn.layout import global_positions, shard_tensor  # noqa: E402
from ring_attn.packing import balance, example_mixes  # noqa: E402
from ring_attn.varlen import varlen_attention  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tile_areas(q_pos: torch.Tensor, k_pos: torch.Tensor, cu: tuple[int, ...],
               q_block: int = 64, k_block: int = 128, is_causal: bool = True
               ) -> tuple[int, int, int]:
    """(skipped, full, partial) score elements of one kernel call on queries / keys at
    global positions q_pos / k_pos (local order; >= T: padding, in no document), tiled
    q_block x k_block in local order as the CPU forward kernel tiles them, each tile
    classified by visibility.h's classify_tile from the min/max of its positions and
    documents. Only partial tiles are masked element-wise; full and partial ones cost
    the same matrix products."""
    cu_t = torch.tensor(cu)
    t = cu[-1]

    def spans(pos: torch.Tensor, block: int) -> tuple[torch.Tensor, ...]:
        doc = torch.searchsorted(cu_t, pos, right=True) - 1
        doc = torch.where(pos >= t, torch.full_like(doc, -1), doc)
        n = -(-pos.numel() // block)
        pad = n * block - pos.numel()
        tiles = [torch.cat([x, x[-1:].expand(pad)]).view(n, block) for x in (pos, doc)]
        size = torch.full((n,), block)
        size[-1] -= pad
        return (tiles[0].amin(1), tiles[0].amax(1), tiles[1].amin(1), tiles[1].amax(1),
                size)

    if q_pos.numel() == 0 or k_pos.numel() == 0:
        return 0, 0, 0
    qlo, qhi, qdlo, qdhi, qn = (x[:, None] for x in spans(q_pos, q_block))
    klo, khi, kdlo, kdhi, kn = (x[None, :] for x in spans(k_pos, k_block))
    skip = (qdhi < 0) | (kdhi < 0) | (kdlo > qdhi) | (kdhi < qdlo)
    full = (qdlo == qdhi) & (kdlo == kdhi) & (qdlo == kdlo)
    if is_causal:
        skip = skip | (klo > qhi)
        full = full & (khi <= qlo)
    full = full & ~skip
    area = qn * kn
    return (int((area * skip).sum()), int((area * full).sum()),
            int((area * (~skip & ~full)).sum()))


def tile_fractions(cu: tuple[int, ...]) -> tuple[float, float, float]:
    """varlen_attention's one call on the whole pack: fractions of the S x S scores in
    skipped, full and partial 64 x 128 tiles."""
    pos = torch.arange(cu[-1])
    areas = tile_areas(pos, pos, cu)
    return tuple(a / max(1, sum(areas)) for a in areas)


def ring_tile_area(cu: tuple[int, ...], p: int, layout: str) -> list[int]:
    """Per rank, the score elements its ring blocks compute (non-skipped 64 x 128 tiles of
    its queries against every rank's keys)."""
    s_local = -(-cu[-1] // p)
    kw = {} if layout == "contiguous" else {"cu_seqlens": cu}
    pos = [global_positions(r, p, s_local, layout, **kw) for r in range(p)]
    return [sum(sum(tile_areas(pos[r], pos[s], cu)[1:]) for s in range(p)) for r in range(p)]


def rank_compute_ms(cu: tuple[int, ...], p: int, layout: str, q: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor, reps: int) -> list[float]:
    """Measured per-rank compute of the pass-KV ring without a process group: rank r's
    query shard against every rank's K/V shard, one kernel call each, with the kernel
    positions of the layout and the documents (the calls the ring makes; blocks or tiles
    with nothing visible are skipped by the kernel's classification). One
    thread, and the calling thread's CPU time (time.thread_time), best of `reps` per rank,
    ms: on a shared machine wall time counts other jobs' time slices, thread CPU time
    does not. q, k, v: [1, H, S, D]."""
    cu_t = torch.tensor(cu)
    s = cu[-1]
    s_local = -(-s // p)
    kw = {} if layout == "contiguous" else {"cu_seqlens": cu}
    pos = [global_positions(r, p, s_local, layout, **kw) for r in range(p)]
    if layout == "contiguous":
        assert s % p == 0, "the contiguous figures need S divisible by P"
    shards = [[shard_tensor(x, r, p, layout, 2, **kw).contiguous() for r in range(p)]
              for x in (q, k, v)]
    scale = q.shape[-1] ** -0.5
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for r in range(p):
            best = float("inf")
            for _ in range(reps):
                t0 = time.thread_time()
                for src in range(p):
                    ops.attn_fwd(shards[0][r], shards[1][src], shards[2][src], None, pos[r],
                                 pos[src], is_causal=True, scale=scale, cu_seqlens_q=cu_t,
                                 cu_seqlens_k=cu_t)
                best = min(best, (time.thread_time() - t0) * 1e3)
            times.append(best)
    finally:
        torch.set_num_threads(threads)
    return times


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
    emit("## Documents, and the tiles of varlen_attention's one kernel call")
    emit("")
    emit("Share of the S x S scores in 64 x 128 forward tiles that are skipped, computed "
         "whole (full) or masked element-wise (partial).")
    emit("")
    emit("| mix | docs | longest | skipped | full | partial |")
    emit("|---|---|---|---|---|---|")
    for name, cu in mixes.items():
        sk, fu, pa = tile_fractions(cu)
        longest = max(b - a for a, b in zip(cu, cu[1:]))
        emit(f"| {name} | {len(cu) - 1} | {longest} | {sk:.1%} | {fu:.1%} | {pa:.1%} |")
    if not args.skip_times:
        times(args, mixes, emit)
    ranks(args, mixes, emit)
    load1 = os.getloadavg()
    emit("")
    emit(f"# load average at the end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    return lines


def times(args: argparse.Namespace, mixes: dict, emit) -> None:
    s, h = args.seq, args.heads
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


def ranks(args: argparse.Namespace, mixes: dict, emit) -> None:
    s, h, p = args.seq, args.heads, args.world_size
    g = torch.Generator().manual_seed(1)
    emit("")
    emit(f"## The ring at P={p}: contiguous vs packed layout")
    emit("")
    emit("pairs: exact causal pairs per rank (the schedule); step factor: sum over ring steps "
         "of the slowest rank's pairs / (total / P); tiles: score elements in the non-skipped "
         "64 x 128 forward tiles of each rank's blocks, total / visible pairs and max/min "
         "over ranks; measured: each rank's blocks run in one process (float32, D=64, H="
         f"{h}, forward; one thread, thread CPU time, best of {args.iters}), ms per rank "
         "and max/min.")
    emit("")
    emit("| mix | layout | pairs max/min | step factor | tiles / visible | tiles max/min | "
         "measured ms per rank | measured max/min |")
    emit("|---|---|---|---|---|---|---|---|")
    for name, cu in mixes.items():
        q, k, v = (torch.randn(1, h, s, 64, generator=g) for _ in range(3))
        for layout in ("contiguous", "packed"):
            b = balance(cu, p, layout)
            area = ring_tile_area(cu, p, layout)
            cells = "- | -"
            if not args.skip_ranks:
                with torch.no_grad():
                    ms = rank_compute_ms(cu, p, layout, q, k, v, args.iters)
                cells = (f"{' / '.join(f'{t:.0f}' for t in ms)} | "
                         f"{max(ms) / min(ms):.3f}")
            emit(f"| {name} | {layout} | {b.imbalance:.4f} | {b.step_factor:.4f} | "
                 f"{sum(area) / sum(b.per_rank):.2f} | {max(area) / min(area):.3f} | {cells} |")


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
    ap.add_argument("--skip-ranks", action="store_true",
                    help="leave out the measured per-rank compute")
    ap.add_argument("--skip-times", action="store_true",
                    help="leave out the ours / mask / loop timings")
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
            # "# ..." header lines would render as headings in markdown: list items there.
            f.write("\n".join("- " + ln[2:] if ln.startswith("# ") else ln for ln in lines)
                    + "\n")


if __name__ == "__main__":
    main()
