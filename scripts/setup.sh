#!/usr/bin/env bash
# Sets up ring_attn on a fresh machine (GPU or not): installs the pinned torch and the test
# and example dependencies from requirements.txt, then builds the extension in place against
# that torch. The CUDA kernels are compiled whenever nvcc is on PATH (RING_ATTN_CUDA=0 skips
# them); the architectures come from TORCH_CUDA_ARCH_LIST, never from a visible GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -m pip install --disable-pip-version-check -q -r requirements.txt

if [[ "${RING_ATTN_CUDA:-auto}" != "0" ]] && command -v nvcc >/dev/null; then
  cuda_torch=$("$PY" -c 'import torch; print((torch.version.cuda or "").split(".")[0])')
  cuda_nvcc=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\..*/\1/p')
  if [[ -n "$cuda_torch" && "$cuda_torch" != "$cuda_nvcc" ]]; then
    echo "setup: nvcc is CUDA $cuda_nvcc but torch was built with CUDA $cuda_torch;" \
         "the majors must match (or set RING_ATTN_CUDA=0 for a CPU-only build)" >&2
    exit 1
  fi
  # Same default as setup.py: sm_80/sm_90 machine code + compute_90 PTX for newer GPUs.
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"
  echo "setup: building CPU and CUDA kernels (CUDA $cuda_nvcc, archs $TORCH_CUDA_ARCH_LIST)"
else
  echo "setup: building CPU kernels only"
fi

start=$(date +%s)
"$PY" -m pip install --disable-pip-version-check -q --no-build-isolation -e .
echo "setup: extension built in $(( $(date +%s) - start )) s"
"$PY" -c 'import torch, ring_attn; print("setup: ring_attn", ring_attn.__version__, "on torch", torch.__version__)'
