"""Build and environment decisions that no kernel test would notice: the default CUDA
architectures embed PTX (so GPUs newer than sm_90 get a kernel), setup.py and
scripts/setup.sh agree on that default, and the torch range in pyproject.toml covers both
the pinned torch and the one CI's compatibility step (and the GPU machines) use."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def _setup_module():
    """setup.py imported, not run (its setup() call is under `if __name__ == "__main__"`)."""
    spec = importlib.util.spec_from_file_location("ring_attn_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_default_cuda_archs_embed_ptx(monkeypatch):
    archs = _setup_module().DEFAULT_CUDA_ARCHS
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


def test_archs_define_names_the_built_archs():
    # The launcher's "no kernel image for this GPU" error names these; the value must
    # survive a shell (ninja runs each compile through one) and nvcc: no ';', space or ','.
    define = _setup_module().archs_define
    assert define("8.0;9.0+PTX") == "-DRING_ATTN_CUDA_ARCHS=8.0/9.0+PTX"
    assert define(" 8.6 9.0 ") == "-DRING_ATTN_CUDA_ARCHS=8.6/9.0"


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


def _tile_variants(hd: int, backward: bool) -> int:
    """How many tile variants tile_config.h has for (hd, direction): select_tile (through
    ring_attn::_cuda_tile_config) asked for ever smaller limits until nothing fits."""
    import torch
    import ring_attn  # noqa: F401  (registers torch.ops.ring_attn)
    limit, seen = 1 << 30, []
    while True:
        try:
            cfg = list(torch.ops.ring_attn._cuda_tile_config(hd, torch.bfloat16, backward, limit))
        except RuntimeError:
            return len(seen)
        seen.append(cfg[4])
        assert cfg[4] == len(seen) - 1, (hd, backward, seen)
        limit = cfg[3] - 1


def test_every_tile_variant_is_instantiated_and_kept_by_both_builds(monkeypatch):
    # launch.cu references run_{fwd,bwd}_tc<Elem, hd, v> for every variant v of every
    # compiled head dim, so each needs exactly one file in csrc/cuda/inst/, and both
    # builds' RING_ATTN_HEAD_DIMS filters (setup.py and CMakeLists.txt) must keep it: a
    # variant file the filter drops is an undefined symbol at import time.
    inst_dir = os.path.join(ROOT, "csrc", "cuda", "inst")
    files = {f: _read("csrc", "cuda", "inst", f) for f in os.listdir(inst_dir) if f.endswith(".cu")}
    cmake_re = re.search(r'list\(FILTER _inst_sources INCLUDE REGEX "([^"]+)"\)',
                         _read("CMakeLists.txt")).group(1).replace("\\\\", "\\")
    setup = _setup_module()
    for hd in (64, 96, 128, 192, 256):
        monkeypatch.setenv("RING_ATTN_HEAD_DIMS", str(hd))
        monkeypatch.chdir(ROOT)
        kept_setup = {os.path.basename(f) for f in setup.cuda_sources()}
        kept_cmake = {f for f in files if re.search(cmake_re.replace("${_re}", str(hd)), f)}
        for backward, fn in ((False, "run_fwd_tc"), (True, "run_bwd_tc")):
            for v in range(_tile_variants(hd, backward)):
                for elem in ("__nv_bfloat16", "__half"):
                    sym = f"{fn}<{elem}, {hd}, {v}>"
                    owners = [f for f, text in files.items() if sym in text]
                    assert len(owners) == 1, (sym, owners)
                    assert owners[0] in kept_setup, (sym, owners[0], "setup.py")
                    assert owners[0] in kept_cmake, (sym, owners[0], "CMakeLists.txt")
