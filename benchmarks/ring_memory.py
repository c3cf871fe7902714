"""Per-rank memory of the CPU ring: the buffers each moment needs, and the measured peak.

    python benchmarks/ring_memory.py        # P = 2, 4; float32, bfloat16; writes results/

Units: X = one q shard [B, H, S/P, D] in the input dtype (q, k, v, dout, out are one X
each), A = the same in the accumulation dtype (float32: A = X for float32, 2X for bf16).
Measured: peak RSS during the forward and during the backward minus the RSS before the
forward (the inputs q, k, v, dout are already there, so they are excluded; the output and
everything the pass allocates are included), worst rank, MALLOC_MMAP_THRESHOLD_=131072 so
a freed buffer leaves the RSS at once.

Live beyond the inputs at each moment of the ring (full ring, no window; ring.py,
comm.py; "partials": the kernel's fresh float32 dq, dk, dv (3A) or out (A) per call, which
the op contract (attn_fwd / attn_bwd return new tensors) makes unavoidable):

  forward  step 0        own K/V packed for sending 2X + receive 2X + out partial A
           step 0<t<P-1  held K/V 2X + receive 2X + out accumulator A + partial A
           step P-1      held 2X + accumulator A + partial A
  backward (out X, saved by the forward, is live throughout)
           step 1        dq acc A + held K/V 2X + receive 2X (P > 2) + partials 3A +
                         the held shard's new dK/dV accumulator 2A
           step 1<t<P-1  dq A + held 2X + receive 2X + dK/dV accumulator sent on 2A +
                         the next one arriving 2A + partials 3A
           step P-1      dq A + held 2X + sent on 2A + arriving 2A + partials 3A
           end           dq A + the accumulator sent home 2A (in flight) + the own sums
                         arriving 2A + the own block's partials 3A (they become the own
                         dK/dV sums: ring.py computes the own block last)

Minimum of an overlapped pass-KV ring on top of its inputs and outputs, with the op
contract's partials: K/V double buffer (2 K/V pairs, 4X), dK/dV double buffer (one sent
on while the next arrives, 4A), dq accumulator A, partials 3A (backward) / A (forward), the
out accumulator A (forward): backward X + 4X + 8A at a middle step (P >= 4; P = 2, 3 have
no step where both double buffers are full: their largest moment is listed), forward
4X + 2A (P >= 3). The table compares the measured peak with the largest moment above.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_ring import (RESULTS, machine_info, reset_peak_rss, rss_mib,  # noqa: E402
                        save_results)

B, H, S, D = 1, 8, 8192, 64


def derived(p: int, a: float) -> tuple[float, float, str, str]:
    """(forward, backward) largest live set beyond the inputs, in X, for a = A / X, and
    which moment it is."""
    fwd = {"step 0": 4 + a}
    if p > 2:
        fwd["middle step"] = 4 + 2 * a
    fwd["last step"] = 2 + 2 * a
    bwd = {"step 1": 1 + 2 + (2 if p > 2 else 0) + 6 * a, "end": 1 + 8 * a}
    if p > 3:
        bwd["middle step"] = 1 + 4 + 8 * a
    if p > 2:
        bwd["last step"] = 1 + 2 + 8 * a
    f, b = max(fwd, key=fwd.get), max(bwd, key=bwd.get)
    return fwd[f], bwd[b], f, b


def worker(out_path: str) -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    import ring_attn
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, dout = (torch.randn(B, H, S // world, D).to(dtype) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        x_mib = q.numel() * q.element_size() / 2**20
        for it in range(2):  # the first pass warms up (thread pools, gloo pairs)
            q.grad = k.grad = v.grad = None
            dist.barrier()
            reset_peak_rss()
            base = rss_mib()[0]
            out = ring_attn.ring_attention(q, k, v, layout="contiguous")
            fwd = rss_mib()[1] - base
            reset_peak_rss()
            out.backward(dout)
            bwd = rss_mib()[1] - base
            del out
        peaks = torch.tensor([fwd, bwd], dtype=torch.float64)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        rows.append(dict(world=world, dtype=str(dtype).split(".")[1], x_mib=x_mib,
                         fwd_mib=peaks[0].item(), bwd_mib=peaks[1].item()))
    if rank == 0:
        with open(out_path, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    dist.destroy_process_group()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    raw = os.path.join(RESULTS, "ring_memory_accounting.jsonl")
    if os.path.exists(raw):
        os.remove(raw)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    for p in (2, 4):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={p}", os.path.abspath(__file__), "--worker", raw],
                       check=True, env=env)
    rows = [json.loads(line) for line in open(raw)]
    info = machine_info()
    lines = ["# Ring memory per rank: derived live set vs measured peak (CPU, gloo)", "",
             f"Machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}; "
             f"{info['date']}.", "Command: `python benchmarks/ring_memory.py`", "",
             f"B={B}, H={H}, S={S}, D={D}, non-causal, forward then backward, 1 thread per "
             "rank. X = one q shard in the input dtype; beyond the inputs (q, k, v, dout), "
             "worst rank. Derived: the largest live set of benchmarks/ring_memory.py's "
             "docstring (which moment in brackets); it is the minimum of an overlapped "
             "pass-KV ring with fresh kernel partials at P >= 4 (backward) / P >= 3 "
             "(forward).", "",
             "| P | dtype | X MiB | fwd derived X | fwd measured X | bwd derived X | "
             "bwd measured X | bwd measured / derived |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a = 1.0 if r["dtype"] == "float32" else 2.0
        f, b, fm, bm = derived(r["world"], a)
        fx, bx = r["fwd_mib"] / r["x_mib"], r["bwd_mib"] / r["x_mib"]
        lines.append(f"| {r['world']} | {r['dtype']} | {r['x_mib']:.1f} | {f:.0f} ({fm}) | "
                     f"{fx:.2f} | {b:.0f} ({bm}) | {bx:.2f} | {bx / b:.3f} |")
    save_results("ring_memory_accounting", "\n".join(lines) + "\n", rows, raw)


if __name__ == "__main__":
    main()
