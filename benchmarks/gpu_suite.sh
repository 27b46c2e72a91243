#!/usr/bin/env bash
# The prepared GPU check: `benchmarks/gpu_suite.sh` on a GPU machine, `benchmarks/gpu_suite.sh --dry-run` on any
# machine (CI). Writes gpu_suite.json, gpu_suite.md and gpu_suite.log to $OUT (default ./gpu_suite_out).
# Packages the machine lacks come from the wheels in .whl/ (`make gpu-wheels` fills it; ignored by git),
# installed into a private folder put first on PYTHONPATH. Steps and time boxes: benchmarks/gpu_suite.py.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " != *" --dry-run "* ]] && compgen -G ".whl/*.whl" > /dev/null; then
  site="${TMPDIR:-/tmp}/memlm-gpu-site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
    || echo "gpu_suite: installing .whl/ failed; going on with what the machine has" >&2
  export PYTHONPATH="$site:$PYTHONPATH"
fi
exec "$PYTHON" benchmarks/gpu_suite.py --out "$OUT" "$@"
