#!/usr/bin/env bash
# Builds ring_attn (CPU kernels) against another torch and runs the test suite with it, so
# that a change which only works on the pinned torch fails CI. The GPU machines this project
# runs on carry torch 2.11.0+cu130 and no network; requirements.txt pins 2.15.0.
#
#   scripts/check_torch_compat.sh 2.11.0 [pytest args...]   (default: the whole suite;
#   e.g. tests/test_build_config.py -x for a quick look)
#
# Nothing of the main environment changes: torch VERSION goes into its own venv
# (.venv-torch<VERSION>/, git-ignored, reused on the next run when it already holds that
# version), and the extension is built in a copy of the source tree under
# build/compat-torch<VERSION>/ (git-ignored), never over the in-place ring_attn/_C*.so.
# The script checks both properties at the end (pip freeze and the in-place .so, before
# vs after) and fails if either changed.
#
# Cost, measured on the 2-core CI machine (PyPI at ~90 MB/s): the venv with torch 2.11.0 and
# its CUDA dependencies (~4.7 GB installed; torch runs on CPU without a GPU) ~70 s, the
# CPU-only build ~40 s, the suite as long as the main run's (~2-3 min).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VER=${1:?usage: scripts/check_torch_compat.sh TORCH_VERSION [pytest args...]}
shift
PY=${PYTHON:-python3}
VENV="$ROOT/.venv-torch$VER"
WORK="$ROOT/build/compat-torch$VER"

fingerprint() {  # what must not change: the main env's packages and the in-place extension
  { "$PY" -m pip freeze --disable-pip-version-check 2>/dev/null
    sha256sum ring_attn/_C*.so 2>/dev/null || true; } | sha256sum
}
before=$(fingerprint)

venv_torch() { "$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null; }
if [[ "$(venv_torch || true)" != "$VER" ]]; then
  start=$(date +%s)
  "$PY" -m venv --clear "$VENV"
  # One resolver run for torch and the test/example dependencies (requirements.txt minus
  # its torch pin), so pip picks versions consistent with this torch.
  grep -v -E '^[[:space:]]*(#|torch[=<>~! ]|$)' requirements.txt > "$VENV/requirements-no-torch.txt"
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q \
    "torch==$VER" -r "$VENV/requirements-no-torch.txt"
  echo "compat: installed torch $VER and test dependencies in $(( $(date +%s) - start )) s ($VENV)"
fi
[[ "$(venv_torch)" == "$VER" ]] || { echo "compat: $VENV does not hold torch $VER" >&2; exit 1; }

# A fresh copy of the tracked (and new, not ignored) files: the build writes only there.
rm -rf "$WORK"
mkdir -p "$WORK"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK"
cd "$WORK"
start=$(date +%s)
if ! RING_ATTN_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" setup.py build_ext --inplace \
    > build.log 2>&1; then
  tail -n 60 build.log >&2
  echo "compat: the CPU build FAILED against torch $VER (full log: $WORK/build.log)" >&2
  exit 1
fi
echo "compat: extension built against torch $VER in $(( $(date +%s) - start )) s"
env -u PYTHONPATH "$VENV/bin/python" - "$VER" "$WORK" <<'EOF'
import sys, torch, ring_attn
ver, work = sys.argv[1:]
assert torch.__version__.split("+")[0] == ver, torch.__version__
assert ring_attn.__file__.startswith(work), f"imported {ring_attn.__file__}, not the copy"
print(f"compat: ring_attn from {ring_attn.__file__} on torch {torch.__version__}")
EOF

set +e
# No arguments: pyproject's testpaths (tests/), i.e. the whole suite.
env -u PYTHONPATH "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
cd "$ROOT"
if [[ "$(fingerprint)" != "$before" ]]; then
  echo "compat: the main environment or the in-place extension CHANGED during the check" >&2
  exit 1
fi
if (( rc != 0 )); then
  echo "compat: the test suite FAILED against torch $VER (pytest exit $rc)" >&2
fi
exit $rc
