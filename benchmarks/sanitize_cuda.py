"""Small forward + backward cases of every CUDA kernel family, meant to run under NVIDIA
compute-sanitizer (memcheck, racecheck, synccheck, initcheck): see
benchmarks/results/README.md. Shapes are tiny so the instrumented run stays short, yet
each case crosses tile edges (ragged query and key tails, padded head dims, skipped causal
tiles), so out-of-bounds reads/writes, smem races between pipeline stages and
uninitialised smem would all be reached.

Families: tensor cores (bf16, fp16) x head dims {64, 96, 128, 192, 256} (each
instantiation once, plus an odd dim padded up and Dv != D, and D % 8 != 0 for load_tile's
8- and 4-byte copies), and the SIMT kernels (float32, float64). Variants per family:
plain, causal with a position map and GQA, bool + additive masks, dropout, out_fp32 /
grad_fp32 with dlse. Every case has GQA (hq = 2 hk) and 3 backward query blocks per head,
so the backward's double-buffered query block is prefetched within and across heads.
Without --quick, the single-stage backward tiles (tile_config.h variant 1) run too, forced
by RING_ATTN_SMEM_LIMIT. Exits non-zero on any CUDA error.

  compute-sanitizer --tool memcheck  python benchmarks/sanitize_cuda.py
  compute-sanitizer --tool racecheck python benchmarks/sanitize_cuda.py --quick
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional

import torch

import ring_attn  # noqa: F401  (registers torch.ops.ring_attn)

Tensor = torch.Tensor


def run_case(dtype: torch.dtype, d: int, dv: int, sq: int, sk: int, hq: int = 2, hk: int = 1,
             causal: bool = False, pos_map: bool = False, mask: Optional[str] = None,
             dropout_p: float = 0.0, fp32_out: bool = False, dlse: bool = False) -> None:
    ops = torch.ops.ring_attn
    g = torch.Generator(device="cuda").manual_seed(sq * 31 + sk)
    q = torch.randn(2, hq, sq, d, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(2, hk, sk, d, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(2, hk, sk, dv, device="cuda", dtype=dtype, generator=g)
    q_pos = torch.arange(sq, device="cuda") * 2 + 5 if pos_map else None
    k_pos = torch.arange(sk, device="cuda") * 2 if pos_map else None
    attn_mask = None
    if mask == "bool":
        attn_mask = torch.rand(1, hq, sq, sk, device="cuda", generator=g) > 0.3
    elif mask == "float":
        attn_mask = torch.randn(sq, sk, device="cuda", generator=g)[None, None]
    seed = torch.tensor(1234, dtype=torch.int64) if dropout_p > 0 else None
    scale = 1.0 / math.sqrt(d)
    args = (attn_mask, q_pos, k_pos, 0, 0, causal, scale, dropout_p, seed)
    out, lse = ops.attn_fwd(q, k, v, *args, fp32_out)
    dout = torch.randn(out.shape, device="cuda", dtype=dtype, generator=g)
    dl = torch.randn(lse.shape, device="cuda", dtype=lse.dtype, generator=g) if dlse else None
    ops.attn_bwd(dout, q, k, v, out, lse, dl, *args, fp32_out)
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="one case per family (racecheck is slow)")
    a = ap.parse_args()
    families = [(dt, d, d) for dt in (torch.bfloat16, torch.float16) for d in (64, 96, 128, 256)]
    families += [(torch.bfloat16, 192, 192), (torch.bfloat16, 72, 40),
                 (torch.float16, 200, 130), (torch.float32, 64, 48), (torch.float64, 40, 40)]
    if not a.quick:
        families += [(torch.bfloat16, 36, 34)]  # rows on 16/8-byte and 4-byte boundaries
    variants = [dict()] if a.quick else [
        dict(),
        dict(causal=True, pos_map=True, hq=4, hk=2),
        dict(mask="bool"),
        dict(mask="float", causal=True),
        dict(dropout_p=0.3, causal=True),
        dict(fp32_out=True, dlse=True),
    ]
    for dtype, d, dv in families:
        for var in variants:
            # 130 x 97: ragged tails for the 128-row forward and 64-row backward tiles.
            run_case(dtype, d, dv, 130, 97, **var)
            print(f"ok {str(dtype):15s} D={d:3d} Dv={dv:3d} {var}", flush=True)
    if not a.quick:
        # The single-stage backward tiles: hd128 on 99 KB GPUs, hd192 / hd256 on sm_80.
        for d, limit in ((128, 101_376), (192, 166_912), (256, 166_912)):
            os.environ["RING_ATTN_SMEM_LIMIT"] = str(limit)
            run_case(torch.bfloat16, d, d, 130, 97, causal=True, pos_map=True, hq=4, hk=2)
            print(f"ok single-stage backward D={d} (RING_ATTN_SMEM_LIMIT={limit})", flush=True)
        del os.environ["RING_ATTN_SMEM_LIMIT"]
    print("all cases ran without a CUDA error")


if __name__ == "__main__":
    main()
