#!/usr/bin/env bash
# make gpu-check: everything a GPU machine (no internet) can tell us, in one call, into one folder:
# build the extension in place, GPU tests, compute-sanitizer memcheck + racecheck on one small case
# per kernel, every benchmark. Output (at most 8 files): the results JSON, PNG plots, one log.
#   bash bench/gpu_check.sh [OUT_DIR]      (default: $OUT, else bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check.log"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
status=0
step() { echo "=== $* ($(date -u +%T))" | tee -a "$LOG"; }

step "build: pip install --no-build-isolation --no-deps -e . (XJFAST_CUDA_ARCHS=${XJFAST_CUDA_ARCHS:-90a;100a})"
$PY -m pip install -q --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 || { echo "build failed" | tee -a "$LOG"; exit 1; }
$PY -m xjfast info 2>&1 | tee -a "$LOG"

step "GPU tests: pytest -m gpu, then the rest of the suite with the GPU visible"
$PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -n 30 | tee -a "$LOG" || status=1
$PY -m pytest -q -m "not gpu" -p no:cacheprovider tests 2>&1 | tail -n 15 | tee -a "$LOG" || status=1

step "compute-sanitizer memcheck and racecheck, one small case per kernel"
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 $PY -m bench.sanitize 2>&1 | tail -n 8 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "compute-sanitizer $tool: errors" | tee -a "$LOG"; status=1; }
done

step "benchmarks"
$PY -m bench.run "$OUT_DIR" 2>&1 | tee -a "$LOG" || status=1
step "done (status $status)"
exit $status
