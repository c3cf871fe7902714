"""python -m ring_attn.plan: the planner's table (or --json), or --calibrate.

    python -m ring_attn.plan --model llama3-8b --seq 1M --devices 8 --device h100 \
        --fabric nvlink4 [--train | --infer] [--checkpointing] [--budget 80GiB] [--json]
    python -m ring_attn.plan --calibrate --out cpu.json     # then --preset cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys

from .model import Shape
from .planner import parse_tokens, plan, report
from .presets import DEVICES, FABRICS, MODELS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ring_attn.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    p.add_argument("--heads", type=int, help="override: query heads")
    p.add_argument("--kv-heads", type=int, help="override: key/value heads")
    p.add_argument("--head-dim", type=int, help="override: head dimension")
    p.add_argument("--layers", type=int, help="override: number of layers")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"], default="bf16")
    p.add_argument("--seq", default="1M", help="global tokens: 4096, 128K, 1M (K, M = 2^10, 2^20)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--device", default="h100", choices=sorted(DEVICES))
    p.add_argument("--fabric", default="nvlink4", choices=sorted(FABRICS))
    p.add_argument("--preset", help="a calibration JSON (--calibrate): device and fabric")
    p.add_argument("--efficiency", type=float, help="fraction of peak FLOP/s reached")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", dest="train", action="store_true", default=True)
    mode.add_argument("--infer", dest="train", action="store_false")
    p.add_argument("--non-causal", dest="causal", action="store_false", default=True)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--budget", help="memory per device, e.g. 80GiB (default: the device's)")
    p.add_argument("--reserve", default="0", help="kept back from the budget (weights, ...)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--calibrate", action="store_true", help="measure this machine instead")
    p.add_argument("--out", default="ring_attn_preset.json", help="--calibrate: output file")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096],
                   help="--calibrate: block sizes S for the kernel")
    p.add_argument("--link-mib", type=int, default=64, help="--calibrate: largest message")
    a = p.parse_args(argv)
    if a.calibrate:
        from .calibrate import calibrate
        rec = calibrate(a.sizes, a.out, max_link_mib=a.link_mib)
        d, f = rec["device"], rec["fabric"]
        print(f"kernel fwd {d['flops'] / 1e9:.1f} GFLOP/s, bwd {d['flops_bwd'] / 1e9:.1f} "
              f"GFLOP/s ({d['cores']} cores; 1 thread: {d['core_flops'] / 1e9:.1f} / "
              f"{d['core_flops_bwd'] / 1e9:.1f}); gloo {f['bandwidth'] / 1e9:.2f} GB/s, "
              f"{f['latency'] * 1e6:.0f} us. Wrote {a.out}")
        return 0
    nbytes = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}[a.dtype]
    shape = None
    if any(x is not None for x in (a.heads, a.kv_heads, a.head_dim, a.layers)):
        h, hk, d, layers, hidden = MODELS[a.model]
        heads = a.heads or h
        shape = Shape(heads, a.kv_heads or min(hk, heads), a.head_dim or d, a.layers or layers,
                      a.batch, None, nbytes, 8 if nbytes == 8 else 4, 8,
                      hidden if a.heads is None and a.head_dim is None else None)
    try:
        res = plan(a.model, parse_tokens(a.seq), a.devices, a.device, a.fabric, a.train,
                   a.checkpointing, a.budget, a.reserve, a.causal, a.batch, nbytes, a.preset,
                   a.efficiency, shape)
    except ValueError as e:
        p.error(str(e))
    print(json.dumps(res, indent=1) if a.json else report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
