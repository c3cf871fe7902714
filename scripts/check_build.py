"""Checks an in-place build before anything else runs on it (scripts/gpu_check.sh, build step):

  1. the CUDA kernels are registered (a build without nvcc silently has CPU kernels only);
  2. an error raised by the extension reaches Python as a RuntimeError with its numbers.

(2) guards against a compiler that links its own copy of libstdc++ into the extension. On
a GPU image whose CC/CXX wrapped gcc 13 with its own -B library directory, the extension
got a static libstdc++: the first error message that formatted an integer (any shape
check) segfaulted in std::ostream::_M_insert<long>, taking pytest down with it.

Exit status 0 when both hold; a crash (signal) or 1 otherwise.
"""
from __future__ import annotations

import sys

import torch

import ring_attn


def main() -> int:
    if not torch._C._dispatch_has_kernel_for_dispatch_key("ring_attn::attn_fwd", "CUDA"):
        print("check_build: ring_attn was built without its CUDA kernels", file=sys.stderr)
        return 1
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        q = torch.zeros(1, 1, 4, 8, device=dev, dtype=torch.bfloat16)
        k = torch.zeros(1, 1, 4, 16, device=dev, dtype=torch.bfloat16)
        try:
            torch.ops.ring_attn.attn_fwd(q, k, k, None, None, None, 0, 0, False, 1.0, 0.0,
                                         None, False)
        except RuntimeError as e:
            if "8" not in str(e) or "16" not in str(e):
                print(f"check_build: the {dev} error lost its numbers: {e}", file=sys.stderr)
                return 1
        else:
            print(f"check_build: a head-dim mismatch on {dev} raised nothing", file=sys.stderr)
            return 1
    print(f"ring_attn {ring_attn.__file__}: CUDA kernels registered; error messages format "
          f"on {', '.join(devices)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
