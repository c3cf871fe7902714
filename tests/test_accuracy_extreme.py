"""float32 accuracy in extreme cases: very large logits (std 4 to 120, so scores reach
~500) with few keys (2 to 15), against torch SDPA's own float32 error, both measured
against float64 in the same run.

Cause of the former excess (up to 5.2x torch's max error, 2.9x its RMS): with fewer than
16 keys the Q K^T product ran one FMA chain over all D steps, while torch's sgemm reduces
such narrow products in vector lanes, so its scores carried about half the rounding
error, and at large logits the score error dominates everything else (the exp, the
rescales and P V add < 1/5 of it: attention on float64 scores rounded once to float32
is 3-10x more accurate than either kernel). The score products of tiles with fewer than
16 keys now reduce in 8 accumulator chains (split_k, gemm.h); our mean score error is 0.9-1.0x
torch's and the pooled RMS out error 0.63x torch's. The max error of one small case is
decided by the few near-tied rows (two keys with close scores) and so is a noisy
statistic: with equal score error distributions it still ranges 0.3-3.3x torch's from
draw to draw (median 0.83x), hence the pooled RMS and median bounds and a 4x bound on
the worst single case.
"""
from __future__ import annotations

import os
import subprocess
import sys

_SCRIPT = r"""
import math, torch, torch.nn.functional as F
from ring_attn import ops
sq_ours = sq_theirs = 0.0
ratios = []
for seed in range(3):
    g = torch.Generator().manual_seed(seed)
    for sk in (2, 3, 5, 8, 15):
        for d in (16, 64):
            for std in (4, 40, 120):  # the logits' standard deviation
                q = torch.randn(1, 8, 64, d, generator=g) * math.sqrt(std)
                k = torch.randn(1, 8, sk, d, generator=g) * math.sqrt(std)
                v = torch.randn(1, 8, sk, d, generator=g)
                ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
                ours = ops.attn_fwd(q, k, v, scale=1 / math.sqrt(d))[0].double() - ref
                theirs = F.scaled_dot_product_attention(q, k, v).double() - ref
                sq_ours += ours.pow(2).sum().item()
                sq_theirs += theirs.pow(2).sum().item()
                ratios.append(ours.abs().max().item() / max(theirs.abs().max().item(), 1e-12))
rms = math.sqrt(sq_ours / sq_theirs)
r = torch.tensor(ratios)
# Measured (AVX-512 and AVX2 paths alike): pooled RMS 0.63x torch's (1.21x before the
# accumulator chains), per-case max ratio median 0.83x (1.25x), worst 3.27x (3.54x).
assert rms <= 1.0, f"pooled RMS error {rms:.2f}x torch's"
assert r.median() <= 1.0, f"median per-case max error {r.median():.2f}x torch's"
assert r.max() <= 4.0, f"worst per-case max error {r.max():.2f}x torch's"
print("ok", rms, r.median().item(), r.max().item())
"""


def _run(env_extra: dict[str, str]) -> str:
    env = dict(os.environ, **env_extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_fp32_large_logits_few_keys_cpu() -> None:
    # In process: the default (AVX-512 where the CPU has it) path.
    exec(compile(_SCRIPT, "<accuracy>", "exec"), {})


def test_fp32_large_logits_few_keys_avx2_path() -> None:
    # ATEN_CPU_CAPABILITY=avx2: torch and our kernels both take their AVX2 paths.
    assert _run({"ATEN_CPU_CAPABILITY": "avx2"}).startswith("ok")
