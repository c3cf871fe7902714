"""Build and environment decisions that no kernel test would notice: the default CUDA
architectures embed PTX (so GPUs newer than sm_90 get a kernel), setup.py and
scripts/setup.sh agree on that default, and the torch range in pyproject.toml covers both
the pinned torch and the one CI's compatibility step (and the GPU machines) use."""
from __future__ import annotations

import ast
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _default_archs() -> str:
    for node in ast.parse(_read("setup.py")).body:
        if isinstance(node, ast.Assign) and any(
                getattr(t, "id", None) == "DEFAULT_CUDA_ARCHS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no DEFAULT_CUDA_ARCHS")


def test_default_cuda_archs_embed_ptx(monkeypatch):
    archs = _default_archs()
    assert "8.0" in archs.split(";") and archs.endswith("9.0+PTX"), archs
    # scripts/setup.sh exports the same default when TORCH_CUDA_ARCH_LIST is unset.
    assert f'TORCH_CUDA_ARCH_LIST:-{archs}' in _read("scripts", "setup.sh")
    # What nvcc is then told: sm_80 and sm_90 machine code, plus compute_90 PTX that the
    # driver can JIT for sm_100 / sm_120 (SASS alone: "no kernel image is available").
    cpp_extension = pytest.importorskip("torch.utils.cpp_extension")
    if not hasattr(cpp_extension, "_get_cuda_arch_flags"):
        pytest.skip("this torch has no _get_cuda_arch_flags")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", archs)
    flags = cpp_extension._get_cuda_arch_flags()
    assert "-gencode=arch=compute_90,code=compute_90" in flags, flags
    assert "-gencode=arch=compute_80,code=sm_80" in flags
    assert "-gencode=arch=compute_90,code=sm_90" in flags


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def test_torch_range_covers_pinned_and_ci_checked_versions():
    spec = re.search(r'dependencies = \["torch([^"]*)"\]', _read("pyproject.toml"))
    assert spec, "pyproject.toml: torch dependency not found"
    bounds = dict(re.findall(r"(>=|<)\s*([\d.]+)", spec.group(1)))
    pinned = re.search(r"^torch==([\d.]+)", _read("requirements.txt"), re.M).group(1)
    checked = re.search(r"check_torch_compat\.sh\s+([\d.]+)", _read(".ci", "run")).group(1)
    low, high = _version(bounds[">="]), _version(bounds["<"])
    # CI checks the lowest supported torch, and the pinned one lies inside the range.
    assert _version(checked)[:2] == low[:2], (checked, bounds)
    assert low <= _version(pinned) < high, (pinned, bounds)


def test_compat_script_needs_a_version():
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "check_torch_compat.sh")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "usage" in proc.stderr
