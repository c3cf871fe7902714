"""Scale case: a 1M-token causal bf16 forward + backward through the 8-rank simulated ring
on one GPU (B=1, H=8, D=128, zigzag), with time and peak memory, checked against an
independent float64 reference and against torch's own SDPA (its flash kernel) on the same
inputs.

Full attention in float64 at S = 2^20 is out of reach, so the check uses what is exact
and cheap:
  - out and dq on sampled query rows (first, last, chunk edges, random), computed per row
    in float64 over all of the row's keys: out_i = softmax(s_i) V and
    dq_i = scale * sum_j P_ij (dO_i.v_j - dO_i.out_i) k_j are row-local;
  - dk and dv through identities that hold over all keys: sum_j dV_j = sum_i dO_i (each
    causal row's probabilities sum to 1; query heads summed per key/value head) and
    sum_j dK_j = 0 (softmax is shift-invariant), the sums taken in float64.
Each quantity passes when our max error <= 4 x torch SDPA's error on the same quantity
+ 1e-3 x max(1, max|ref|) (the test suite's criterion, tests/helpers.py). Exits 1 on a
failure.

  python benchmarks/scale_1m.py                       # S = 2^20 on the GPU (~45 GiB)
  python benchmarks/scale_1m.py --device cpu --tiny   # CPU-size smoke (tests)
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from ring_attn.simulated import simulated_ring_attention

Tensor = torch.Tensor
FACTOR, FLOOR = 4.0, 1e-3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="S=1024, H=2, D=32 (smoke test)")
    p.add_argument("--seq", type=int, default=None, help="default 2^20 (--tiny: 1024)")
    p.add_argument("--heads", type=int, default=None, help="default 8 (--tiny: 2)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128 (--tiny: 32)")
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--layout", default="zigzag")
    p.add_argument("--rows", type=int, default=48, help="sampled query rows per check")
    a = p.parse_args(argv)
    a.seq = a.seq or (1024 if a.tiny else 1 << 20)
    a.heads = a.heads or (2 if a.tiny else 8)
    a.head_dim = a.head_dim or (32 if a.tiny else 128)
    return a


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def sample_rows(s: int, world: int, n: int) -> Tensor:
    """First and last rows, the edges of every layout chunk (2P chunks), and random rows."""
    chunk = s // (2 * world)
    edges = [i * chunk + d for i in range(2 * world + 1) for d in (-1, 0) if 0 <= i * chunk + d < s]
    g = torch.Generator().manual_seed(1)
    rand = torch.randint(0, s, (max(0, n - len(edges)),), generator=g).tolist()
    return torch.tensor(sorted(set(edges + rand + [0, s - 1])))


def reference_rows(q: Tensor, k: Tensor, v: Tensor, dout: Tensor, rows: Tensor,
                   scale: float) -> tuple[Tensor, Tensor]:
    """float64 out and dq of causal attention at `rows`, one head at a time."""
    outs, dqs = [], []
    pos = torch.arange(k.size(2), device=k.device)
    for h in range(q.size(1)):
        kh, vh = k[0, h].double(), v[0, h].double()
        qr, dor = q[0, h, rows].double(), dout[0, h, rows].double()
        s = (qr @ kh.T) * scale
        s.masked_fill_(pos[None, :] > rows.to(k.device)[:, None], -math.inf)
        p = torch.softmax(s, dim=-1)
        del s
        o = p @ vh
        dp = dor @ vh.T
        ds = p * (dp - (dor * o).sum(-1, keepdim=True))
        del p, dp
        outs.append(o)
        dqs.append((ds @ kh) * scale)
        del ds, kh, vh
    return torch.stack(outs), torch.stack(dqs)


def sum_keys_f64(x: Tensor, chunk: int = 1 << 16) -> Tensor:
    """float64 sum over dim 1 of [H, S, D], in chunks: a whole float64 copy at S = 2^20
    would be 8 GiB."""
    return sum(x[:, i:i + chunk].double().sum(1) for i in range(0, x.size(1), chunk))


def run(attn, q: Tensor, k: Tensor, v: Tensor, dout: Tensor, rows: Tensor,
        device: str) -> dict[str, object]:
    """fwd + bwd of `attn`; returns times, peak memory and the sampled pieces to check."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = attn(q, k, v)
    sync(device)
    t1 = time.perf_counter()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    sync(device)
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    r = rows.to(q.device)
    res = {"fwd_s": t1 - t0, "bwd_s": t2 - t1, "peak_gib": peak,
           "out": out.detach()[0, :, r].double(), "dq": dq[0, :, r].double(),
           "sum_dk": sum_keys_f64(dk[0]), "sum_dv": sum_keys_f64(dv[0]),
           "finite": all(bool(torch.isfinite(t).all()) for t in (out, dq, dk, dv))}
    del out, dq, dk, dv
    return res


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("scale_1m: --device cuda needs a CUDA GPU", file=sys.stderr)
        return 2
    b, h, s, d = 1, a.heads, a.seq, a.head_dim
    scale = 1.0 / math.sqrt(d)
    g = torch.Generator(device=a.device).manual_seed(0)
    q, k, v, dout = (torch.randn(b, h, s, d, device=a.device, dtype=torch.bfloat16, generator=g)
                     for _ in range(4))
    rows = sample_rows(s, a.world, a.rows)
    dev = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"# scale case on {dev}, torch {torch.__version__}: causal bf16 fwd+bwd, B=1, "
          f"H={h}, S={s}, D={d}; ours = {a.world}-rank simulated ring ({a.layout}), "
          f"torch = F.scaled_dot_product_attention; {len(rows)} sampled rows")
    ours = run(lambda *t: simulated_ring_attention(*t, world_size=a.world, layout=a.layout,
                                                   is_causal=True), q, k, v, dout, rows, a.device)
    theirs = run(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True),
                 q, k, v, dout, rows, a.device)
    ref_out, ref_dq = reference_rows(q, k, v, dout, rows.to(q.device), scale)
    exact = {"out": ref_out, "dq": ref_dq,
             "sum_dv": sum_keys_f64(dout[0]),  # Hq == Hk here: one query head per kv head
             "sum_dk": torch.zeros(h, d, dtype=torch.float64, device=q.device)}

    flops = 4.0 * b * h * s * s * d / 2 * 3.5  # causal fwd + bwd, FlashAttention convention
    print("\n| run | fwd s | bwd s | fwd+bwd TFLOP/s | peak GiB (inputs included) |")
    print("|---|---|---|---|---|")
    for name, r in (("ours", ours), ("torch SDPA", theirs)):
        total = r["fwd_s"] + r["bwd_s"]
        print(f"| {name} | {r['fwd_s']:.2f} | {r['bwd_s']:.2f} | {flops / total / 1e12:.1f} | "
              f"{r['peak_gib']:.1f} |")
    print("\n| quantity | ours max err | torch max err | bound | result |")
    print("|---|---|---|---|---|")
    failed = 0 if ours["finite"] else 1
    for key in ("out", "dq", "sum_dk", "sum_dv"):
        ref = exact[key]
        e_ours = float((ours[key] - ref).abs().max())
        e_torch = float((theirs[key] - ref).abs().max())
        bound = FACTOR * e_torch + FLOOR * max(1.0, float(ref.abs().max()))
        ok = e_ours <= bound
        failed += not ok
        print(f"| {key} | {e_ours:.3e} | {e_torch:.3e} | {bound:.3e} | {'ok' if ok else 'FAIL'} |")
    if not ours["finite"]:
        print("# FAIL: ours produced non-finite values")
    print(f"# {'FAILED' if failed else 'passed'}: ours/torch fwd+bwd time "
          f"{(ours['fwd_s'] + ours['bwd_s']) / (theirs['fwd_s'] + theirs['bwd_s']):.2f}x")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
