"""Error of ring attention against float64 attention as the ring grows (P = 1 ... 8).

The simulated ring drives the same per-step kernel calls and float32 merge as the
torch.distributed ring (ring_attn/block.py), so its error is the ring's error; the gloo
tests (tests/test_ring.py) check the two agree. The figure to read: the bf16 error must
stay flat in P and stay at or below torch's one-device bf16 SDPA error.

    python benchmarks/ring_accuracy.py [--seq 1680] [--max-p 8]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from ring_attn.simulated import simulated_ring_attention

Tensor = torch.Tensor


def grads_of(out: Tensor, inputs: list[Tensor], dout: Tensor) -> list[Tensor]:
    return [out.detach(), *torch.autograd.grad(out, inputs, dout)]


def max_errors(world: int, layout: str, dtype: torch.dtype, seq: int) -> list[float]:
    """max |ours - float64| of out, dq, dk, dv; world 0 = torch's one-device SDPA."""
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, 4, seq, 32, generator=g) for _ in range(4))
    low = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ref = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    if world == 0:
        out = F.scaled_dot_product_attention(*low, is_causal=True)
    else:
        out = simulated_ring_attention(*low, world_size=world, layout=layout, is_causal=True)
    ours = grads_of(out, low, dout.to(dtype))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        exact = grads_of(F.scaled_dot_product_attention(*ref, is_causal=True), ref,
                         dout.to(dtype).double())
    return [(a.double() - b).abs().max().item() for a, b in zip(ours, exact)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=1680, help="divisible by 2P for every P")
    p.add_argument("--max-p", type=int, default=8)
    args = p.parse_args()
    print(f"# causal, B=1, H=4, S={args.seq}, D=32; max abs error vs float64, fwd and bwd")
    print("| dtype | ring | P | out | dq | dk | dv |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).replace("torch.", "")
        e = max_errors(0, "", dtype, args.seq)
        print(f"| {name} | torch SDPA, one device | - | " + " | ".join(f"{x:.2e}" for x in e) + " |")
        for layout in ("zigzag", "striped", "contiguous"):
            for world in range(1, args.max_p + 1):
                e = max_errors(world, layout, dtype, args.seq)
                print(f"| {name} | {layout} | {world} | " + " | ".join(f"{x:.2e}" for x in e)
                      + " |", flush=True)


if __name__ == "__main__":
    main()
