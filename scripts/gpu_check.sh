#!/usr/bin/env bash
# Everything a GPU machine can tell us, in one command, with the torch already installed
# there and no network:
#
#   scripts/gpu_check.sh RESULTS_DIR [STEP ...]
#
# Steps, most important first (default: all, in this order):
#   build     the extension for the visible GPU's arch only (TORCH_CUDA_ARCH_LIST from
#             torch.cuda.get_device_capability(), MAX_JOBS = cores, bounded by memory),
#             in place, no pip; then scripts/check_build.py: the CUDA kernels are
#             registered and an error message formats (a compiler that links a static
#             libstdc++ segfaults there; the build is then retried with /usr/bin/g++)
#   tests     the CUDA tests (pytest -m cuda); fails if none passed
#   sanitize  benchmarks/sanitize_cuda.py under compute-sanitizer: memcheck on every case
#             (masks, dropout, position maps and fp32 outputs each have their own
#             addressing), racecheck and synccheck on the quick set (three steps)
#   ring      the simulated ring on the GPU, P = 2, 4, 8, every layout, causal, GQA, bf16,
#             fwd + bwd vs torch SDPA (benchmarks/gpu_ring_check.py)
#   scale     1M-token causal bf16 fwd + bwd, 8-rank simulated ring, H=8, D=128: time, peak
#             memory, sampled-row check (benchmarks/scale_1m.py)
#   bench     fwd and bwd vs torch SDPA's flash and cuDNN backends, bf16, D = 64/128,
#             S = 2k..32k, causal and not, TFLOP/s, ratios, matmul ceiling
#             (benchmarks/bench_local.py --device cuda)
#
# RESULTS_DIR gets summary.md (GPU, driver, CUDA, torch versions, then one row per step,
# written as each step starts and ends, so a run cut short still leaves its results), a
# log per step, and markdown tables (ring.md, scale.md, bench.md). Each step runs under
# `timeout`, and the whole run under GPU_CHECK_BUDGET seconds (default 1200: the 20
# minutes an H100 is given); a step that fails or times out is recorded and the run goes
# on. Running later steps into the same RESULTS_DIR appends to its summary, so the steps
# can be spread over several sessions (`... RESULTS_DIR build tests`, then `... ring`).
#
# Exit status: 0 every step passed; 1 some step failed, timed out or did not fit the
# budget; 2 usage; 3 no CUDA GPU visible to torch; 4 nvcc not found (needed to build);
# 5 torch cannot be imported.
set -uo pipefail
cd "$(dirname "$0")/.."
# The benchmarks import ring_attn from this checkout (built in place), not an install.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
ALL_STEPS=(build tests sanitize ring scale bench)

usage() { echo "usage: scripts/gpu_check.sh RESULTS_DIR [${ALL_STEPS[*]}]" >&2; exit 2; }
[[ $# -ge 1 && "$1" != -* ]] || usage
OUT=$1
shift
STEPS=("$@")
[[ ${#STEPS[@]} -gt 0 ]] || STEPS=("${ALL_STEPS[@]}")
for s in "${STEPS[@]}"; do
  [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "gpu_check: unknown step '$s'" >&2; usage; }
done
wants() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

# --- preflight: leave at once, with a distinct status, where nothing can run ------------
cap=$("$PY" -c '
import sys
try:
    import torch
except Exception as e:
    print(f"torch cannot be imported: {e}"); sys.exit(5)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False)")
    sys.exit(3)
print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
rc=$?
if (( rc != 0 )); then
  (( rc == 3 || rc == 5 )) || rc=5
  echo "gpu_check: nothing to do here: ${cap:-python failed}. This script needs an NVIDIA" \
       "GPU and the CUDA toolkit; on a CPU machine run the test suite instead" \
       "(python3 -m pytest tests -q)." >&2
  exit $rc
fi
NVCC=$(command -v nvcc || true)
for c in "${CUDA_HOME:-}/bin/nvcc" /usr/local/cuda/bin/nvcc; do
  [[ -z "$NVCC" && -x "$c" ]] && NVCC=$c
done
if wants build && [[ -z "$NVCC" ]]; then
  echo "gpu_check: nvcc not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): the build" \
       "step needs the CUDA toolkit." >&2
  exit 4
fi
[[ -n "$NVCC" ]] && export PATH="$(dirname "$NVCC"):$PATH"
SAN=$(command -v compute-sanitizer || true)
for c in bin/compute-sanitizer compute-sanitizer/compute-sanitizer; do  # toolkit layouts
  [[ -z "$SAN" && -n "$NVCC" && -x "$(dirname "$NVCC")/../$c" ]] && SAN="$(dirname "$NVCC")/../$c"
done

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.md"
BUDGET=${GPU_CHECK_BUDGET:-1200}
DEADLINE=$(( $(date +%s) + BUDGET ))
FAILED=0

if [[ ! -f "$SUMMARY" ]]; then
  {
    echo "# scripts/gpu_check.sh results"
    echo
    "$PY" - <<'EOF'
import platform, subprocess, torch
p = torch.cuda.get_device_properties(0)
def cmd(*a):
    try:
        return subprocess.run(a, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return "not found"
driver = cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader").splitlines()
print(f"- GPU: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.0f} GiB ({torch.cuda.device_count()} visible)")
print(f"- driver: {driver[0] if driver else 'unknown'}")
print(f"- torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}), Python {platform.python_version()}")
EOF
    echo "- nvcc: $("$NVCC" --version 2>/dev/null | sed -n 's/.*release \(.*\)/\1/p' || echo none)"
    echo "- compute-sanitizer: $([[ -n "$SAN" ]] && "$SAN" --version 2>/dev/null | tail -n 1 || echo 'not found')"
    echo "- ring_attn commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "- host: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 2^20}' /proc/meminfo)"
    echo
    echo "| step | result | seconds | output |"
    echo "|---|---|---|---|"
  } > "$SUMMARY"
fi
echo "gpu_check: GPU sm_${cap/./}, results in $OUT, budget ${BUDGET}s, steps: ${STEPS[*]}"

# run_step NAME LIMIT_S CMD...: runs CMD under `timeout`, output to NAME.log; the summary
# row says "running" while it runs and the result after. Tables (lines starting with "|"
# or "#") printed by CMD are copied to NAME.md when TABLE=1.
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( DEADLINE - $(date +%s) ))
  if (( left < 30 )); then
    echo "| $name | NOT RUN: the ${BUDGET} s budget was spent | 0 | - |" >> "$SUMMARY"
    echo "gpu_check: $name NOT RUN (budget spent)"
    FAILED=$(( FAILED + 1 ))
    LAST_RC=1
    return
  fi
  (( limit > left )) && limit=$left
  local log="$OUT/$name.log" start
  start=$(date +%s)
  echo "| $name | running since $(date -u +%H:%M:%S) UTC (limit ${limit} s) | - | $name.log |" >> "$SUMMARY"
  { echo "\$ $*"; echo; } > "$log"
  timeout --kill-after=30 "$limit" "$@" >> "$log" 2>&1
  local rc=$? secs result files="$name.log"
  secs=$(( $(date +%s) - start ))
  if [[ "${TABLE:-0}" == 1 ]]; then
    grep -E '^(\||#)' "$log" > "$OUT/$name.md" || true
    files="$name.md, $files"
  fi
  case $rc in
    0) result="ok" ;;
    124|137) result="TIMEOUT after ${limit} s" ;;
    *) result="FAILED (exit $rc)" ;;
  esac
  (( rc == 0 )) || FAILED=$(( FAILED + 1 ))
  LAST_RC=$rc
  sed -i "s/^| $name | running since .*/| $name | $result | $secs | $files |/" "$SUMMARY"
  echo "gpu_check: $name: $result in ${secs}s ($log)"
  (( rc == 0 )) || tail -n 15 "$log" | sed 's/^/    /'
}

if wants build; then
  # One nvcc job peaks near 3 GiB (setup.py), so jobs = min(cores, GiB / 3).
  mem_gib=$(awk '/MemTotal/ {print int($2 / 2^20)}' /proc/meminfo)
  jobs=$(nproc)
  (( mem_gib / 3 < jobs )) && jobs=$(( mem_gib / 3 > 0 ? mem_gib / 3 : 1 ))
  "$PY" -c 'from torch.utils.cpp_extension import is_ninja_available as n; exit(not n())' ||
    echo "gpu_check: ninja is not installed: the build compiles one file at a time" >&2
  # In place, then scripts/check_build.py on the result (kernels registered, errors format).
  build=(TORCH_CUDA_ARCH_LIST="$cap" MAX_JOBS="$jobs" RING_ATTN_CUDA=1 bash -c
         "'$PY' setup.py build_ext --inplace && '$PY' scripts/check_build.py")
  run_step build 900 env "${build[@]}"
  if (( LAST_RC != 0 )) && [[ -n "${CC:-}${CXX:-}" ]] && [[ -x /usr/bin/g++ ]]; then
    # A CC/CXX wrapper that links a static libstdc++ builds an extension whose first
    # formatted error segfaults (scripts/check_build.py says why); the system compiler
    # links the libstdc++ that torch loads. The failed row stays in the summary.
    echo "gpu_check: build failed with CC=${CC:-} CXX=${CXX:-}; again with /usr/bin/gcc, /usr/bin/g++"
    rm -rf build
    run_step build-system-cxx 900 env CC=/usr/bin/gcc CXX=/usr/bin/g++ "${build[@]}"
    (( LAST_RC == 0 )) && FAILED=$(( FAILED - 1 ))
  fi
fi

if wants tests; then
  # -m cuda selects the CUDA tests; a run where every one of them skipped (no CUDA kernels,
  # no device) would say nothing, so it fails unless some passed.
  # With pytest-xdist, 8 workers: a CUDA fault poisons one worker's context, not the run
  # (an H200 ran the suite in 58 s with 6).
  par=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8")
  run_step tests 600 bash -c "'$PY' -m pytest tests -m cuda -q -p no:cacheprovider -rfEs $par \
    --junitxml='$OUT/tests.xml'; rc=\$?; '$PY' -c \"
import sys, xml.etree.ElementTree as ET
s = ET.parse('$OUT/tests.xml').getroot().find('testsuite')
n, f, e, k = (int(s.get(x)) for x in ('tests', 'failures', 'errors', 'skipped'))
print(f'cuda tests: {n - f - e - k} passed, {f + e} failed, {k} skipped')
sys.exit(0 if n - f - e - k > 0 else 1)\" && exit \$rc"
fi

if wants sanitize; then
  if [[ -z "$SAN" ]]; then
    echo "| sanitize | FAILED: compute-sanitizer not found | 0 | - |" >> "$SUMMARY"
    FAILED=$(( FAILED + 1 ))
  else
    # No caching allocator: each tensor is its own cudaMalloc, so memcheck sees a read past
    # a tensor's end instead of it landing inside a larger cached block.
    run_step sanitize-memcheck 300 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SAN" --tool memcheck --error-exitcode 1 "$PY" benchmarks/sanitize_cuda.py
    run_step sanitize-racecheck 420 "$SAN" --tool racecheck --racecheck-report all \
      --error-exitcode 1 "$PY" benchmarks/sanitize_cuda.py --quick
    run_step sanitize-synccheck 300 "$SAN" --tool synccheck --error-exitcode 1 \
      "$PY" benchmarks/sanitize_cuda.py --quick
  fi
fi

wants ring && TABLE=1 run_step ring 300 "$PY" benchmarks/gpu_ring_check.py
wants scale && TABLE=1 run_step scale 420 "$PY" benchmarks/scale_1m.py
# B = 32768 / S keeps 32k tokens per call (B=16 at S=2k ... B=1 at 32k), so short
# sequences still fill every SM, as FlashAttention's own benchmarks do.
wants bench && TABLE=1 run_step bench 480 "$PY" benchmarks/bench_local.py --device cuda \
  --dtype bfloat16 --head-dim 64 128 --seq 2048 4096 8192 16384 32768 --mode fwd bwd \
  --tokens 32768 --iters 10 --markdown

echo "gpu_check: $FAILED step(s) failed; summary: $SUMMARY"
cat "$SUMMARY"
(( FAILED == 0 ))
