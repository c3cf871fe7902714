"""PyTorch's context-parallel ring on CPU, driven the way a user can today.

torch's public `context_parallel` fails on CPU (no DTensor sharding strategy for
aten._scaled_dot_product_flash_attention_for_cpu), but its ring internals,
`_templated_ring_attention` and `_templated_ring_attention_backward` (the latter not
re-exported by the old experimental/_attention.py stub) in
torch/distributed/tensor/experimental/_context_parallel/_attention.py (torch 2.15), take
the attention op as an argument and run over gloo once torch's CPU flash op is plugged
in. This module is that plug: one autograd.Function, the two rotate methods
(`_RotateMethod.ALL_GATHER`: one all-gather of every K/V shard up front;
`ALL_TO_ALL`: a permute per step, K/V one hop at a time, like ring_attn), and torch's
head-tail load balancing for causal (its shards are ring_attn's zigzag shards: rank r holds
chunks r and 2P - 1 - r of 2P), which torch requires for causal and forbids otherwise.

    torchrun --standalone --nproc-per-node 2 benchmarks/torch_cp.py   # correctness check

The check compares forward and gradients, after unsharding, with torch SDPA on the full
sequence in float64 (both methods, causal and not, float32 and bfloat16) and asserts
torch CP's error is within a small multiple of one-device SDPA's in the same dtype, so the
benchmark (bench_ring.py --vs-torch-cp) compares correct implementations.
"""
from __future__ import annotations

import contextlib
import time
import datetime
import os
import sys
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.tensor.experimental._context_parallel import _attention as cp

Tensor = torch.Tensor
METHODS = {"allgather": cp._RotateMethod.ALL_GATHER, "alltoall": cp._RotateMethod.ALL_TO_ALL}
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _fwd_op(query: Tensor, key: Tensor, value: Tensor, *, is_causal: bool,
            scale: float) -> tuple[Tensor, Tensor]:
    return _flash(query, key, value, 0.0, is_causal, scale=scale)


def _bwd_op(*, grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
            logsumexp: Tensor, is_causal: bool, scale: float) -> tuple[Tensor, ...]:
    return _flash_bwd(grad_out, query, key, value, out, logsumexp, 0.0, is_causal,
                      scale=scale)


@contextlib.contextmanager
def _options(method: str, causal: bool) -> Iterator[None]:
    """torch's module-level CP options for one call (restored after)."""
    saved = (cp._cp_options.rotate_method, cp._cp_options.enable_load_balance)
    cp._cp_options.rotate_method = METHODS[method]
    cp._cp_options.enable_load_balance = causal  # required for causal, refused otherwise
    try:
        yield
    finally:
        cp._cp_options.rotate_method, cp._cp_options.enable_load_balance = saved


class _TorchRing(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, group: Any, causal: bool,
                scale: float, method: str) -> Tensor:
        with _options(method, causal):
            out, lse = cp._templated_ring_attention(group, 2, _fwd_op, q, k, v,
                                                    is_causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, scale, method)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        group, causal, scale, method = ctx.args
        with _options(method, causal):
            dq, dk, dv = cp._templated_ring_attention_backward(
                group, 2, _bwd_op, dout.contiguous(), "grad_out", q, k, v, out, lse,
                is_causal=causal, scale=scale)
        return dq, dk, dv, None, None, None, None


def torch_cp_attention(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool = False,
                       method: str = "alltoall", group: Any = None) -> Tensor:
    """This rank's attention output over the ring, torch CP's way. Shards [B, H, S/P, D]:
    contiguous without causal, zigzag (torch's head-tail) with causal."""
    group = group if group is not None else dist.group.WORLD
    return _TorchRing.apply(q, k, v, group, is_causal, q.size(-1) ** -0.5, method)


# ------------------------------------------------------------------------- check

def check(rank: int, world: int) -> None:
    """Raises unless torch CP (both methods) and ring_attn, on the benchmark's shards,
    match float64 SDPA on the full sequence within 4x one-device SDPA's own error."""

    from ring_attn.layout import shard_tensor as shard, unshard_tensors as unshard
    B, H, S, D = 1, 2, 256 * world, 32
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (False, True):
            layout = "zigzag" if causal else "contiguous"
            g = torch.Generator().manual_seed(7)
            full = [torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(4)]
            ref = [t.clone().requires_grad_() for t in full[:3]]
            ref_out = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=causal)
            ref_out.backward(full[3])
            refs = [ref_out.detach()] + [t.grad for t in ref]
            # torch SDPA's own error in this dtype, one device.
            low = [t.to(dtype).requires_grad_() for t in full[:3]]
            sd = torch.nn.functional.scaled_dot_product_attention(*low, is_causal=causal)
            sd.backward(full[3].to(dtype))
            sdpa_err = [(a.double() - b).abs().max().item()
                        for a, b in zip([sd.detach()] + [t.grad for t in low], refs)]
            for method in IMPLS:  # ring_attn too: the benchmark's shards, its layout
                loc = [shard(t, rank, world, layout).to(dtype).requires_grad_()
                       for t in full[:3]]
                out = _impl(method, *loc, causal)
                out.backward(shard(full[3], rank, world, layout).to(dtype))
                got = [out.detach()] + [t.grad for t in loc]
                for name, mine, r, tol in zip(("out", "dq", "dk", "dv"), got, refs, sdpa_err):
                    whole = [torch.empty_like(mine) for _ in range(world)]
                    dist.all_gather(whole, mine.contiguous())
                    err = (unshard(whole, layout).double() - r).abs().max().item()
                    assert err <= 4 * tol + 1e-6, (method, dtype, causal, name, err, tol)
                if rank == 0:
                    print(f"{method} {dtype} causal={causal}: ok (out, dq, dk, dv "
                          f"within 4x one-device SDPA's error)", flush=True)



if __name__ == "__main__":
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    check(dist.get_rank(), dist.get_world_size())
    dist.destroy_process_group()


# ------------------------------------------------------------------------- comparison
# bench_ring.py --vs-torch-cp launches this worker for each P and writes the report.

IMPLS = ("ring_attn", "torch_allgather", "torch_alltoall")


def _impl(name: str, q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    if name == "ring_attn":
        import ring_attn
        return ring_attn.ring_attention(q, k, v, is_causal=causal,
                                        layout="zigzag" if causal else "contiguous")
    return torch_cp_attention(q, k, v, is_causal=causal, method=name.split("_")[1])


def compare(rank: int, world: int, seq_len: int, causal: bool, dtype: torch.dtype,
            heads: int, head_dim: int, iters: int, rss: Any, reset_peak: Any) -> dict:
    """Interleaved rounds: each round runs every implementation once (fwd + bwd), in an
    order rotated per round, so load drifting on a shared machine hits all alike. Time of
    a pass = its slowest rank; memory = peak RSS during the pass minus RSS before it (the
    inputs already there), worst rank. Returns rank 0's record (others: {})."""
    shape = (1, heads, seq_len // world, head_dim)
    g = torch.Generator().manual_seed(1000 + rank)
    q, k, v, dout = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_()
    times: dict = {n: [] for n in IMPLS}
    mem: dict = {n: [] for n in IMPLS}
    for it in range(iters):
        for j in range(len(IMPLS)):
            name = IMPLS[(it + j) % len(IMPLS)]
            q.grad = k.grad = v.grad = None
            dist.barrier()
            reset_peak()
            base = rss()[0]
            t0 = time.perf_counter()
            out = _impl(name, q, k, v, causal)
            out.backward(dout)
            took = time.perf_counter() - t0
            peak = rss()[1] - base
            del out
            stat = torch.tensor([took, peak], dtype=torch.float64)
            dist.all_reduce(stat, op=dist.ReduceOp.MAX)
            times[name].append(stat[0].item())
            mem[name].append(stat[1].item())
    if rank != 0:
        return {}
    return dict(world=world, seq_len=seq_len, causal=causal, dtype=str(dtype).split(".")[1],
                heads=heads, head_dim=head_dim, iters=iters, times=times, peak_mib=mem)


def worker(args: Any, rss: Any, reset_peak: Any) -> None:
    import json
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1800))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(args.threads)  # the same on both sides (the table says which)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    # Warm-up, untimed: thread pools, gloo pairs, first-touch page faults, every impl.
    compare(rank, world, 512 * world, True, torch.float32, 1, args.head_dim, 1, rss,
            reset_peak)
    out = open(args.out, "a") if rank == 0 else None
    deadline = time.time() + args.budget_s
    for dt in args.dtypes:
        for seq_len in args.seq_lens:
            for causal in (False, True):
                skipped = time.time() > deadline
                flag = torch.tensor([float(skipped)])
                dist.broadcast(flag, 0)  # rank 0's clock decides for all
                if flag.item():
                    res = {} if rank else dict(world=world, seq_len=seq_len, causal=causal,
                                               dtype=dt, skipped="time budget spent")
                else:
                    res = compare(rank, world, seq_len, causal, dtypes[dt], args.heads,
                                  args.head_dim, args.iters, rss, reset_peak)
                if out:
                    res["threads"] = args.threads
                    out.write(json.dumps(res) + "\n")
                    out.flush()
                    print(f"P={world} S={seq_len} causal={causal} {dt}: "
                          + ("skipped" if "skipped" in res else " ".join(
                              f"{n} {sorted(res['times'][n])[len(res['times'][n]) // 2]:.2f}s"
                              for n in IMPLS)), flush=True)
    dist.destroy_process_group()


def _med(xs: list) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def report(rows: list, machine: str, command: str) -> str:
    """The README-style table: medians, spreads and paired ratios per configuration."""
    r0 = next(r for r in rows if "times" in r)
    lines = [
        "# ring_attn vs PyTorch's context-parallel ring on CPU (gloo)",
        "",
        machine,
        f"Command: `{command}`",
        "",
        f"B=1, H={r0['heads']}, D={r0['head_dim']}, forward + backward; {r0['threads']} torch "
        "thread(s) per rank on both sides (P=4 time-slices 2 cores). torch CP = "
        "`_templated_ring_attention(_backward)` with aten's CPU flash op "
        "(benchmarks/torch_cp.py, checked against float64 SDPA); causal uses torch's "
        "head-tail balancing and ring_attn's zigzag (the same shards), non-causal the "
        "contiguous split. Each round runs the three once, interleaved, order rotated; "
        f"{r0['iters']} rounds. Time: median [min-max] of the slowest rank's pass. "
        "torch/ours: median [min-max] over rounds of the same-round ratio (> 1: ring_attn "
        "faster). Memory: median over rounds of the worst rank's peak RSS during the pass "
        "minus RSS before it (inputs excluded; outputs, gradients, buffers included).",
        "",
        "| P | S | causal | dtype | ring_attn s | torch all-gather s | torch all-to-all s | "
        "torch/ours all-gather | torch/ours all-to-all | MiB/rank ours | all-gather | "
        "all-to-all |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    wins, total = 0, 0
    for r in sorted(rows, key=lambda r: (r["world"], r["dtype"], r["seq_len"], r["causal"])):
        head = f"| {r['world']} | {r['seq_len']} | {'yes' if r['causal'] else 'no'} | {r['dtype']} |"
        if "times" not in r:
            lines.append(head + f" not run: {r['skipped']} |" + " |" * 7)
            continue
        t, m = r["times"], r["peak_mib"]
        cells = [f"{_med(t[n]):.2f} [{min(t[n]):.2f}-{max(t[n]):.2f}]" for n in IMPLS]
        ratios = []
        for n in IMPLS[1:]:
            rr = [a / b for a, b in zip(t[n], t["ring_attn"])]
            ratios.append(f"{_med(rr):.2f} [{min(rr):.2f}-{max(rr):.2f}]")
            total += 1
            wins += _med(rr) > 1 and _med(m["ring_attn"]) < _med(m[n])
        mems = [f"{_med(m[n]):.1f}" for n in IMPLS]
        lines.append(head + " " + " | ".join(cells + ratios + mems) + " |")
    lines += ["", f"ring_attn faster (median paired ratio > 1) with less memory in {wins} of "
              f"{total} (configuration, torch method) pairs run.", ""]
    return "\n".join(lines)
