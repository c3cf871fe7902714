"""scripts/gpu_check.sh and its Python pieces, on a machine without a GPU: the script must
leave at once with its distinct status, and the ring check, the scale case and the CUDA
benchmark's argument parsing must run at CPU size, so none of them breaks unnoticed
between GPU sessions. Each check is also shown to fail on a wrong attention."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                     f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


def _script_args(piece: str) -> list[str]:
    """The arguments gpu_check.sh passes to benchmarks/<piece>.py (continuations joined)."""
    text = open(SCRIPT).read().replace("\\\n", " ")
    m = re.search(rf'"\$PY" benchmarks/{piece}\.py([^\n]*)', text)
    assert m, f"gpu_check.sh no longer runs benchmarks/{piece}.py"
    return shlex.split(m.group(1))


def _run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **(env or {})))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_gpu_check_exits_cleanly_without_gpu(tmp_path):
    start = time.monotonic()
    proc = _run_script(str(tmp_path / "results"))
    assert proc.returncode == 3, proc.stderr  # 3: no CUDA GPU (1 is a failed step)
    assert "sees no CUDA GPU" in proc.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "results").exists()  # nothing built, nothing written


def test_gpu_check_usage_errors():
    assert _run_script().returncode == 2
    proc = _run_script("/nonexistent", "build", "lint")
    assert proc.returncode == 2 and "unknown step 'lint'" in proc.stderr


def _check_ring_check(device: str, capsys) -> None:
    ring = _load("gpu_ring_check")
    ring.parse_args(_script_args("gpu_ring_check"))  # what gpu_check.sh runs still parses
    assert ring.main(["--device", device, "--tiny", "--worlds", "2", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("| ok |") == 6 and "FAIL" not in out  # 3 layouts x P = 2, 8


def test_ring_check_cpu(capsys):
    _check_ring_check("cpu", capsys)


@pytest.mark.cuda
def test_ring_check_cuda(capsys):
    _check_ring_check("cuda", capsys)


def test_ring_check_fails_on_a_wrong_ring(monkeypatch, capsys):
    ring = _load("gpu_ring_check")
    # A "ring" that forgets the causal mask must be caught on every row.
    monkeypatch.setattr(ring, "simulated_ring_attention",
                        lambda q, k, v, **kw: F.scaled_dot_product_attention(
                            q, k, v, enable_gqa=True))
    assert ring.main(["--device", "cpu", "--tiny", "--worlds", "2", "--layouts",
                      "zigzag"]) == 1
    assert "| FAIL: out, dq, dk, dv |" in capsys.readouterr().out


def _check_scale_case(device: str, capsys) -> None:
    scale = _load("scale_1m")
    a = scale.parse_args(_script_args("scale_1m"))
    assert (a.seq, a.heads, a.head_dim, a.world) == (1 << 20, 8, 128, 8)
    assert scale.main(["--device", device, "--tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("| ok |") == 4 and "# passed" in out


def test_scale_case_cpu(capsys):
    _check_scale_case("cpu", capsys)


@pytest.mark.cuda
def test_scale_case_cuda(capsys):
    _check_scale_case("cuda", capsys)


def test_scale_case_fails_on_a_wrong_ring(monkeypatch):
    scale = _load("scale_1m")
    # Dropping the last key of every row (a missed diagonal) shifts out, dq and the sums.
    def off_by_one(q, k, v, **kw):
        s = q.size(2)
        mask = torch.ones(s, s, dtype=torch.bool).tril(-1)
        mask[0, 0] = True
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    monkeypatch.setattr(scale, "simulated_ring_attention", off_by_one)
    assert scale.main(["--device", "cpu", "--tiny"]) == 1


def test_bench_cuda_arguments_and_cpu_smoke(capsys):
    bench = _load("bench_local")
    a = bench.parse_args(_script_args("bench_local"))
    assert a.device == "cuda" and a.dtype == ["bfloat16"] and a.head_dim == [64, 128]
    assert a.seq == [2048, 4096, 8192, 16384, 32768] and a.mode == ["fwd", "bwd"]
    assert a.tokens == 32768 and a.causal == [False, True]
    bench.main(["--seq", "64", "--head-dim", "16", "--dtype", "float32", "--mode", "fwd",
                "--causal", "yes", "--iters", "1", "--min-time", "0", "--markdown"])
    out = capsys.readouterr().out
    assert out.startswith("# device: ") and "| fwd | float32 | 64 | 1 | 16 | yes |" in out
