"""Ring attention on one long sequence, checked against single-device attention.

    torchrun --standalone --nproc-per-node 4 examples/demo.py            # CPU, gloo
    torchrun --standalone --nproc-per-node 4 examples/demo.py --device cuda   # NCCL
    python examples/demo.py --seq-len 2048                                # 1 process

Every rank builds the same inputs (fixed seed), keeps its shard (ring_attn.shard), and
runs ring attention forward and backward on it, timing the step and its peak memory.
Rank 0 then runs torch's scaled_dot_product_attention on the full sequence, forward and
backward, and compares the gathered ring output and q/k/v gradients with it. PASS needs
every max error <= rtol(dtype) * max|reference|; FAIL exits with status 1.

Memory is the peak resident set (CPU: VmHWM, reset through /proc/self/clear_refs before
each measured phase) or the peak CUDA allocation, minus what was in use when the phase
began (the inputs already): the memory the attention step itself needed, i.e. output,
gradients, the K/V blocks in flight and the kernels' workspaces.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:
    import ring_attn
except ImportError:  # a source checkout without `pip install -e .`: use the tree's package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import ring_attn

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
# Max error allowed relative to max|reference|. A wrong block, position or merge gives
# errors of order 1e-1 relative; float32 rounding gave at most 7e-7 relative (dv: 2.9e-6
# with max|ref| 4.4, S=16384, 4 ranks, zigzag, causal), so the bars sit orders of
# magnitude from both. float64 is float64 end to end (lse and merge in float64).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=8192, help="full sequence length S")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--layout", choices=("zigzag", "striped", "contiguous"), default="zigzag")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per rank (0: cores // ranks, at least 1)")
    return p.parse_args()


class PeakMemory:
    """Peak memory of a phase, in MiB above what was in use when the phase began."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _now_and_peak(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            return (torch.cuda.memory_allocated(self.device) / 2**20,
                    torch.cuda.max_memory_allocated(self.device) / 2**20)
        status = open("/proc/self/status").read()
        kib = {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM")}
        return kib["VmRSS"] / 1024, kib["VmHWM"] / 1024

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        self.base = self._now_and_peak()[0]

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self._now_and_peak()[1] - self.base


def setup(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """Join torchrun's process group, or make a 1-process group for plain `python`."""
    timeout = datetime.timedelta(seconds=300)
    backend = "nccl" if args.device == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or max(1, cores // world))
    return rank, world, device


def make_inputs(args: argparse.Namespace, device: torch.device) -> list[torch.Tensor]:
    """q, k, v, dout on the full sequence; the same on every rank (fixed seed, CPU RNG)."""
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    return [torch.randn(shape, generator=g).to(device=device, dtype=DTYPES[args.dtype])
            for _ in range(4)]


def timed(fn: Callable[[], list[torch.Tensor]], mem: PeakMemory, device: torch.device):
    """Run fn once; return (its results, seconds, peak MiB above the start)."""
    mem.start()
    t0 = time.perf_counter()
    res = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return res, time.perf_counter() - t0, mem.stop()


def main() -> int:
    args = parse_args()
    rank, world, device = setup(args)
    if args.seq_len % (2 * world):
        raise SystemExit(f"--seq-len must be a multiple of 2 x ranks = {2 * world}")
    kw = dict(group=None, layout=args.layout)
    q, k, v, dout = make_inputs(args, device)
    shards = [ring_attn.shard(t, dim=2, **kw).contiguous() for t in (q, k, v, dout)]
    del q, k, v, dout  # each rank keeps only its shard from here on
    mem = PeakMemory(device)

    def ring_step() -> list[torch.Tensor]:
        ql, kl, vl = (t.requires_grad_() for t in shards[:3])
        out = ring_attn.ring_attention(ql, kl, vl, is_causal=args.causal, **kw)
        out.backward(shards[3])
        return [out.detach(), ql.grad, kl.grad, vl.grad]

    warm = [t[:, :, : min(64, t.shape[2])].detach().clone() for t in shards]
    ring_attn.ring_attention(*(t.requires_grad_() for t in warm[:3]), is_causal=args.causal,
                             **kw).backward(warm[3])  # first-call setup stays out of the timing
    dist.barrier()
    ring_res, ring_s, ring_mib = timed(ring_step, mem, device)
    stats = [None] * world
    dist.all_gather_object(stats, (ring_s, ring_mib))
    full = [ring_attn.unshard(t, dim=2, **kw) for t in ring_res]  # gathered for the check
    del ring_res

    ok = True
    if rank == 0:
        torch.set_num_threads(os.cpu_count() or 1)  # the other ranks wait at the barrier

        q, k, v, dout = make_inputs(args, device)
        w = [t[:, :, :64].clone().requires_grad_() for t in (q, k, v)]
        F.scaled_dot_product_attention(*w, is_causal=args.causal).sum().backward()

        def single_step() -> list[torch.Tensor]:
            for t in (q, k, v):
                t.requires_grad_()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
            out.backward(dout)
            return [out.detach(), q.grad, k.grad, v.grad]

        ref, ref_s, ref_mib = timed(single_step, mem, device)
        dtype = DTYPES[args.dtype]
        print(f"ring attention: S={args.seq_len} B={args.batch} H={args.heads} "
              f"D={args.head_dim} {args.dtype} causal={args.causal} layout={args.layout} "
              f"ranks={world} device={device.type} threads/rank="
              f"{args.threads or max(1, (os.cpu_count() or 1) // world)}")
        for r, (s, mib) in enumerate(stats):
            print(f"  rank {r}: fwd+bwd {s:8.3f} s   peak memory {mib:9.1f} MiB")
        print(f"  single device (torch SDPA, full sequence): fwd+bwd {ref_s:8.3f} s   "
              f"peak memory {ref_mib:9.1f} MiB")
        print(f"  max rank peak / single = {max(m for _, m in stats) / max(ref_mib, 1e-9):.3f}"
              f"  (ideal 1/P = {1 / world:.3f})")
        for name, ours, theirs in zip(("out", "dq", "dk", "dv"), full, ref):
            err = (ours.double() - theirs.double()).abs().max().item()
            bound = RTOL[dtype] * theirs.double().abs().max().item()
            ok &= err <= bound
            print(f"  max |ring - torch| {name}: {err:.3e}  (bound {bound:.1e})"
                  f"{'' if err <= bound else '  <-- too large'}")
        print("PASS" if ok else "FAIL", flush=True)
    flag = torch.tensor([int(ok)], device=device)
    dist.broadcast(flag, src=0)
    dist.destroy_process_group()
    return 0 if flag.item() else 1


if __name__ == "__main__":
    sys.exit(main())
