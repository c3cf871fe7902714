"""Build of the ring_attn extension (torch.utils.cpp_extension, against the installed torch).

The CPU kernels always build. The CUDA kernels build whenever nvcc is found, decided by
the toolchain, never by a visible GPU, so a CPU-only machine still compiles every kernel:
  RING_ATTN_CUDA=0            build CPU only, even with nvcc present
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0+PTX": sm_80 and sm_90
                              machine code for A100 and H100/H200, plus compute_90 PTX
                              that the driver JIT-compiles on any newer GPU, e.g.
                              Blackwell sm_100/sm_120, which SASS alone would leave
                              with "no kernel image is available")
  RING_ATTN_HEAD_DIMS         CUDA head dims to instantiate, e.g. "64;128" (default: all)
  MAX_JOBS                    parallel compile jobs (default 2: one nvcc job peaks near
                              3 GiB, so 2 jobs stay far inside a 24 GiB machine)
Build with `pip install --no-build-isolation -e .` so the extension links the torch in use.
"""
from __future__ import annotations

import glob
import os
import re
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# AVX2/FMA is the baseline every x86-64 server of the last decade has. AVX-512 code lives in
# sources named *_avx512.cpp that raise their own ISA with `#pragma GCC target` and are
# entered only after a runtime CPU check, so no AVX-512 instruction runs on a CPU without
# it. Those files include every header *before* the pragma, so no inline function of a
# shared header is ever emitted with AVX-512 code (the build sorts objects by name before
# linking, so link order cannot be relied on to pick the baseline copy).
# torch 2.15's headers need C++20, 2.11's C++17; cpp_extension adds the right -std itself
# (checked: both build here, scripts/check_torch_compat.sh), and our own code stays within
# C++17 so it compiles under either.
# sm_80 + sm_90 SASS, and compute_90 PTX so GPUs newer than sm_90 still get every kernel
# (the PTX was checked to assemble for sm_100 and sm_120 with no spills). scripts/setup.sh
# uses the same default; scripts/gpu_check.sh builds only the visible GPU's arch.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
BASE_CXX = ["-O3", "-fopenmp", "-mavx2", "-mfma", "-mf16c"]


def want_cuda() -> bool:
    flag = os.environ.get("RING_ATTN_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    have_nvcc = shutil.which("nvcc") is not None or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    if flag in ("1", "true", "yes", "on") and not have_nvcc:
        raise RuntimeError("RING_ATTN_CUDA=1 but nvcc was not found (set CUDA_HOME)")
    if have_nvcc and torch.version.cuda is None:
        print("ring_attn: nvcc found but torch is a CPU-only build; building CPU only")
        return False
    return have_nvcc


def cuda_sources() -> list[str]:
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    inst = sorted(glob.glob(os.path.join("csrc", "cuda", "inst", "*.cu")))
    dims = os.environ.get("RING_ATTN_HEAD_DIMS")
    if dims:
        keep = {int(d) for d in re.split(r"[;, ]+", dims) if d}
        inst = [f for f in inst
                if not (m := re.search(r"_hd(\d+)", f)) or int(m.group(1)) in keep]
    return sources + inst


def archs_define(arch_list: str) -> str:
    """-DRING_ATTN_CUDA_ARCHS=8.0/9.0+PTX: the architectures this build holds, for the
    launcher's "no kernel for this GPU" error (C++: #define S(x) #x, #define XS(x) S(x),
    XS(RING_ATTN_CUDA_ARCHS) is "8.0/9.0+PTX"). '/' because ';' or a space would end the
    flag in the shell that ninja runs each compile in, and nvcc splits -D values at ','."""
    archs = [a for a in re.split(r"[;\s]+", arch_list) if a]
    return "-DRING_ATTN_CUDA_ARCHS=" + "/".join(archs)


def extension():
    # The module stub, then the same sources as the CMake library (CMakeLists.txt): the op
    # schemas, the shared host code, the C++ API (csrc/api/) and the CPU kernels.
    sources = [os.path.join("csrc", "python_module.cpp"), os.path.join("csrc", "ring_attn.cpp"),
               os.path.join("csrc", "attn_host.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "api", "*.cpp")))
    cpu = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources += [f for f in cpu if not f.endswith("_avx512.cpp")]
    sources += [f for f in cpu if f.endswith("_avx512.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        nvcc = [archs_define(os.environ["TORCH_CUDA_ARCH_LIST"]),
                "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
                "-lineinfo", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        if os.environ.get("RING_ATTN_HEAD_DIMS"):
            # launch.cu then references only the head dims whose instantiations are built.
            nvcc.append("-DRING_ATTN_HEAD_DIMS_LIMITED")
            built = {int(m.group(1)) for f in cuda_sources() if (m := re.search(r"_hd(\d+)", f))}
            nvcc += [f"-DRING_ATTN_HAS_HD{d}" for d in sorted(built)]
        return CUDAExtension(
            "ring_attn._C", sources + cuda_sources(), include_dirs=include_dirs,
            extra_compile_args={"cxx": BASE_CXX + ["-DRING_ATTN_WITH_CUDA"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"], py_limited_api=False)
    return CppExtension("ring_attn._C", sources, include_dirs=include_dirs,
                        extra_compile_args={"cxx": BASE_CXX}, extra_link_args=["-fopenmp"])


if __name__ == "__main__":  # pip and setuptools run this file as __main__; tests import it
    os.environ.setdefault("MAX_JOBS", "2")
    setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
