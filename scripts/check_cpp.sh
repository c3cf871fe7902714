#!/usr/bin/env bash
# The C++ route, as CI runs it (.ci/run, after the Python tests): configure and build the
# library and its GoogleTest suite against the installed torch (CPU kernels only), run the
# suite with ctest, install the package, then build examples/cpp against the *installed*
# package (find_package(RingAttn)) and run it. Everything goes under build/ (git-ignored).
#
#   scripts/check_cpp.sh            # CPU only (RING_ATTN_CUDA=OFF), as CI
#   RING_ATTN_CUDA=AUTO scripts/check_cpp.sh   # with the CUDA kernels when nvcc is found
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUILD=build/cmake
PREFIX=$PWD/build/cmake-install
TORCH_PREFIX=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
JOBS=${MAX_JOBS:-2}

t0=$(date +%s)
cmake -S . -B "$BUILD" "${GEN[@]}" -DRING_ATTN_CUDA="${RING_ATTN_CUDA:-OFF}" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DCMAKE_INSTALL_PREFIX="$PREFIX" >/dev/null
cmake --build "$BUILD" -j "$JOBS"
t1=$(date +%s)
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS"
t2=$(date +%s)
cmake --install "$BUILD" >/dev/null
cmake -S examples/cpp -B build/example "${GEN[@]}" \
  -DCMAKE_PREFIX_PATH="$PREFIX;$TORCH_PREFIX" >/dev/null
cmake --build build/example -j "$JOBS"
build/example/attention_example
t3=$(date +%s)
echo "check_cpp: configure + build $((t1 - t0)) s, ctest $((t2 - t1)) s," \
     "install + example $((t3 - t2)) s"
