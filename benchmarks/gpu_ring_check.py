"""The ring's numerics on one device: the simulated ring (ring_attn.simulated, the same
per-step kernel calls and float32 merge as the torch.distributed ring) at P = 2, 4, 8, every
layout, causal, GQA, bf16, forward and backward, against torch SDPA on the full sequence.

Each result (out, dq, dk, dv) is compared with float64 attention (torch's math kernel in
float64 on the same device); it passes when our max error <= 4 x the error of torch's own
SDPA in the same dtype on the same inputs + 1e-3 x max(1, max|ref|): the criterion of the
test suite (tests/helpers.py: assert_close_to_ref). Prints a markdown table, one row per
configuration; exits 1 if any row fails.

  python benchmarks/gpu_ring_check.py                     # on the GPU (scripts/gpu_check.sh)
  python benchmarks/gpu_ring_check.py --device cpu --tiny # CPU-size smoke (tests)
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from helpers import ATOL_FLOOR, max_abs_err, randn, sdpa_reference  # noqa: E402

from ring_attn.layout import LAYOUTS  # noqa: E402
from ring_attn.simulated import simulated_ring_attention  # noqa: E402

Tensor = torch.Tensor
FACTOR = 4.0
NAMES = ("out", "dq", "dk", "dv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="CPU-size shapes (smoke test)")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    # S = 2080 = 16 x 130: divisible by 2P for P = 8 (zigzag), and 130-token chunks leave
    # ragged tails in the kernels' 64/128-row tiles.
    p.add_argument("--seq", type=int, default=None, help="default 2080 (--tiny: 48)")
    p.add_argument("--heads", type=int, nargs=2, default=None, metavar=("HQ", "HK"),
                   help="query and key/value heads (GQA), default 8 2 (--tiny: 4 2)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (--tiny: 16)")
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args(argv)
    a.seq = a.seq or (48 if a.tiny else 2080)
    a.heads = a.heads or ([4, 2] if a.tiny else [8, 2])
    a.head_dim = a.head_dim or (16 if a.tiny else 128)
    return a


def inputs(a: argparse.Namespace, dtype: torch.dtype) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    hq, hk = a.heads
    shapes = [(a.batch, hq, a.seq, a.head_dim), (a.batch, hk, a.seq, a.head_dim),
              (a.batch, hk, a.seq, a.head_dim), (a.batch, hq, a.seq, a.head_dim)]
    return [randn(s, dtype, g, a.device) for s in shapes]


def out_and_grads(fn, q: Tensor, k: Tensor, v: Tensor, dout: Tensor) -> list[Tensor]:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_ring_check: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    q, k, v, dout = inputs(a, dtype)
    gqa = a.heads[0] != a.heads[1]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        exact = out_and_grads(lambda *t: sdpa_reference(*t, is_causal=True, enable_gqa=gqa),
                              q.double(), k.double(), v.double(), dout.double())
    theirs = out_and_grads(
        lambda *t: F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=gqa),
        q, k, v, dout)
    err_torch = [max_abs_err(t, e) for t, e in zip(theirs, exact)]
    bounds = [FACTOR * et + ATOL_FLOOR[dtype] * max(1.0, float(e.abs().max()))
              for et, e in zip(err_torch, exact)]
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"# simulated ring on {dev}, torch {torch.__version__}: bf16, causal, "
          f"B={a.batch}, Hq={a.heads[0]}, Hk={a.heads[1]}, S={a.seq}, D={a.head_dim}; "
          f"max abs error vs float64, pass: ours <= {FACTOR:g} x torch + floor")
    print("| ring | P | " + " | ".join(NAMES) + " | time ms | result |")
    print("|---|---|" + "---|" * len(NAMES) + "---|---|")
    print("| torch SDPA, one device | - | " + " | ".join(f"{e:.2e}" for e in err_torch)
          + " | - | reference |")
    print("| bound | - | " + " | ".join(f"{b:.2e}" for b in bounds) + " | - | - |", flush=True)
    failed = 0
    for layout in a.layouts:
        for world in a.worlds:
            start = time.perf_counter()
            try:
                ours = out_and_grads(
                    lambda *t: simulated_ring_attention(*t, world_size=world, layout=layout,
                                                        is_causal=True), q, k, v, dout)
                if a.device == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # record and go on: one broken config must not hide the rest
                failed += 1
                print(f"| {layout} | {world} | " + " | ".join("-" for _ in NAMES)
                      + f" | - | FAIL: {type(e).__name__}: {str(e).splitlines()[0][:80]} |",
                      flush=True)
                continue
            ms = (time.perf_counter() - start) * 1e3
            errs = [max_abs_err(o, e) for o, e in zip(ours, exact)]
            bad = [n for n, e, b in zip(NAMES, errs, bounds) if not e <= b]
            finite = all(bool(torch.isfinite(o).all()) for o in ours)
            ok = not bad and finite
            failed += not ok
            verdict = "ok" if ok else "FAIL: " + ", ".join(bad or ["non-finite values"])
            print(f"| {layout} | {world} | " + " | ".join(f"{e:.2e}" for e in errs)
                  + f" | {ms:.0f} | {verdict} |", flush=True)
    total = len(a.layouts) * len(a.worlds)
    print(f"# {total - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
