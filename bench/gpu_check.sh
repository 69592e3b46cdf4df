#!/usr/bin/env bash
# make gpu-check: everything a GPU machine (no internet) can tell us, in one call, into one folder:
# build the extension in place, a first launch of every GPU implementation in a process of its own
# (one that hangs or crashes is left out of the rest), GPU tests, compute-sanitizer memcheck +
# racecheck on one small launch
# of every kernel of every GPU backend, every benchmark. Output: the results JSON (rewritten after
# each benchmark section), its PNG plots (2) and gpu-check.log: 4 files, at most 8.
#   bash bench/gpu_check.sh [OUT_DIR]      (default: $OUT, else bench/results)
#   STAGES=tests,sanitize bash bench/gpu_check.sh ...   (make gpu-check STAGES=...)
# STAGES picks among the stages that take long, tests, sanitize and benchmarks (default: all
# three), so that a short lease can run them in two calls, or run again what failed; the build,
# xjfast info and the first launches, which protect the rest, always run.
#
# Time: the whole run ends within TOTAL_S (env or make variable; default 520 s, under the 9 minutes
# asked for; a 15-minute lease runs STAGES=benchmarks TOTAL_S=450, then the rest) even if a
# stage hangs: each stage runs under `timeout`, capped at its own limit and at what the stages
# after it still need (the minimums below, of the stages that will run). A failed or timed-out
# stage does not stop the others; the log says per stage: ok, FAILED (exit status) or TIMED OUT.
# The benchmarks get the time left, and XJFAST_BENCH_BUDGET_S tells them so the attention cases
# stop early rather than be cut off. A kernel fault that breaks a process's CUDA context costs
# what that process had left to do, not the stage: the tests' xdist worker ends and is replaced
# (tests/conftest.py), the benchmarks go on in a new process without the implementation that
# faulted (bench/run.py).
#
# Budget per stage on an H100 (cap = the stage's timeout; expected from measurements on the 2-core
# CPU machine, where the build takes 65 s for two archs, the test suite 41 s and the CPU mode of the
# benchmarks 22 s, scaled to 16 cores and one arch plus first-call Triton compiles on the GPU):
#   stage             expected   cap   minimum kept for it (what a stage leaves the later ones)
#   build (1 arch)      30-60    180    60
#   build without _C    10        60    10     only when the build failed
#   xjfast info          3        30     5
#   wheels (.whl/)       5        60     5     only when .whl/ exists (bench/fetch_wheels.sh)
#   first launches      20-40    120    30     bench/first_launch.py: in parallel, 90 s each at most
#                                               (10 at least, + 15 for the parent to report)
#   tests (2-8 workers) 90-150   200    60     pytest-timeout: 150 s per test
#   memcheck            20-40     75    30     PYTORCH_NO_CUDA_MEMORY_CACHING=1
#   racecheck           20-40     75    30
#   benchmarks         200-260   rest  120     roofline 5, attention 70-130 (FlexAttention compiles
#                                               per shape; Triton candidates compile on the first case),
#                                               memory-bound 5, diffusers Wan 20, stream rest
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results}}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-check.log"
: >"$LOG"
PY="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-520}"
[[ "$TOTAL_S" =~ ^[0-9]+$ ]] || { echo "TOTAL_S: expected whole seconds, got '$TOTAL_S'" >&2; exit 2; }
START=$(date +%s)
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
# SASS for this GPU only (halves the build); tests/test_build.py reads the same variable.
if [ -z "${XJFAST_CUDA_ARCHS:-}" ]; then
  cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')
  case "$cc" in
    9*|1[0-9]*) export XJFAST_CUDA_ARCHS="${cc}a" ;;   # sm_90a, sm_100a, sm_103a, sm_120a
    [0-9]*) export XJFAST_CUDA_ARCHS="$cc" ;;
    *) export XJFAST_CUDA_ARCHS="90a;100a" ;;
  esac
fi

STAGES="${STAGES:-tests,sanitize,benchmarks}"
for name in ${STAGES//,/ }; do
  case $name in
    tests|sanitize|benchmarks) ;;
    *) echo "STAGES: expected a comma-separated list of tests, sanitize, benchmarks; got '$STAGES'" >&2; exit 2 ;;
  esac
done
selected() { [[ ",$STAGES," == *",$1,"* ]]; }

# minimum kept for each stage by the ones before it (the table above)
declare -A MINIMUM=([build-without-c]=10 [info]=5 [wheels]=5 [launches]=30 [tests]=60 [memcheck]=30 [racecheck]=30
                   [benchmarks]=120)
# after NAME...: the seconds the named later stages need, those of them that will run
after() {
  local sum=0 name
  for name in "$@"; do
    case $name in
      tests|benchmarks) selected "$name" || continue ;;
      memcheck|racecheck) selected sanitize || continue ;;
      wheels) compgen -G ".whl/*.whl" >/dev/null || continue ;;
    esac
    sum=$((sum + MINIMUM[$name]))
  done
  echo $sum
}

log() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - START)); }
SUMMARY=()
overall=0

# stage NAME CAP_S RESERVE_S COMMAND...: runs COMMAND (output to the log; its tail to stdout) under
# timeout min(CAP_S, time left - RESERVE_S), where RESERVE_S is what the later stages still need;
# COMMAND sees that limit as XJFAST_STAGE_LIMIT_S.
stage() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local left=$((TOTAL_S - $(elapsed) - reserve))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 5 ]; then
    log "=== $name: SKIPPED (no time left: $(elapsed) s of $TOTAL_S s spent)"
    SUMMARY+=("$name: skipped, no time left")
    overall=1
    return
  fi
  log "=== $name (at $(elapsed) s, limit $limit s): $*"
  local t0 rc
  t0=$(date +%s)
  timeout -k 5 "$limit" env XJFAST_STAGE_LIMIT_S="$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0)) verdict
  case $rc in
    0) verdict="ok" ;;
    124|137) verdict="TIMED OUT after $limit s" ;;
    *) verdict="FAILED (exit status $rc)" ;;
  esac
  [ $rc -eq 0 ] || overall=1
  log "=== $name: $verdict in $took s"
  SUMMARY+=("$name: $verdict ($took s)")
}

log "gpu-check at commit ${XJFAST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, XJFAST_CUDA_ARCHS=$XJFAST_CUDA_ARCHS, STAGES=$STAGES, $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.sm,power.draw,temperature.gpu \
  --format=csv 2>&1 | tee -a "$LOG"

stage build 180 "$(after build-without-c info wheels launches tests memcheck racecheck benchmarks)" "$PY" -m pip install -q --no-build-isolation --no-deps -e .
# A failed build (nvcc, CMake or pybind11 missing or failing) also leaves kernels/ uninstalled as
# xjfast.kernels: without _C, the Triton kernels and the rest still run.
if ! "$PY" -c "import xjfast.kernels" >>"$LOG" 2>&1; then
  stage "build without _C" 60 "$(after info wheels launches tests memcheck racecheck benchmarks)" env XJFAST_CUDA_ARCHS= "$PY" -m pip install -q --no-build-isolation --no-deps -e .
fi
stage info 30 "$(after wheels launches tests memcheck racecheck benchmarks)" "$PY" -m xjfast info
if compgen -G ".whl/*.whl" >/dev/null; then
  # wheels carried from a machine with internet (bench/fetch_wheels.sh): diffusers for the drop-in
  # benchmark and the tests that use it, PyAV for `xjfast generate`'s tests; one at a time, so that
  # one this machine refuses (a platform tag) leaves the others installed
  stage wheels 60 "$(after launches tests memcheck racecheck benchmarks)" bash -c 'rc=0
    for w in .whl/*.whl; do
      "$0" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$w" || rc=1
    done
    exit $rc' "$PY"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import diffusers; print('diffusers', diffusers.__version__)" >>"$LOG" 2>&1 ||
  log "diffusers is not importable: the drop-in benchmark and the diffusers tests skip"
"$PY" -c "import av; print('PyAV', av.__version__)" >>"$LOG" 2>&1 ||
  log "PyAV is not importable: the tests of xjfast generate that write MP4 skip"

# Every GPU implementation's first launch, each in a process of its own under a time limit, all at
# once: one that hangs or crashes is left out of the stages below (XJFAST_DISABLE op:backend,
# XJFAST_CUDA_ATTENTION_SKIP for a CUDA attention path), which then run whole.
stage "first launches" 120 "$(after tests memcheck racecheck benchmarks)" "$PY" -m bench.first_launch
for var in XJFAST_DISABLE XJFAST_CUDA_ATTENTION_SKIP; do
  value=$(grep -a "^$var=" "$LOG" | tail -n 1 | cut -d= -f2)
  export "$var=$value"
  [ -z "$value" ] || log "left out of the stages below: $var=$value"
done

# The whole suite once on the GPU (the gpu-marked tests and every backend test with the GPU
# visible), the gpu-marked ones first (tests/conftest.py), a line per test in the log (a stage cut
# off by its limit still says what passed);
# with pytest-xdist, 2 to 8 workers: one per 10 GiB of GPU memory (a test's peak is a few GiB: the
# reference attends in 256 MiB chunks of scores, the Wan-shaped graph test holds 2 blocks of
# weights) and per 2 CPU cores, since the stage is mostly Triton compiling: the suite launches
# ~140 kernel specializations (Triton's own keys, recorded under the interpreter with the binder of
# tests/triton_launches.py), an attention one ~6 s of one core.
# tests/test_sass.py compiles the Triton kernels for sm_90a/sm_100a on the CPU, which CI does under
# both Tritons: here each worker would spend a minute of CPU on it, before the GPU tests after it.
pytest_args=(-v -p no:cacheprovider -rfE --ignore=tests/test_sass.py)
# the thread method ends a worker blocked in a hung kernel (a signal would wait for Python to run)
"$PY" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout=150 --timeout-method=thread)
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -dc 0-9)
cores=$(nproc 2>/dev/null || echo 4)
workers=$(( ${gpu_mib:-0} / 10240 ))
workers=$(( workers > cores / 2 ? cores / 2 : workers ))
workers=$(( workers < 2 ? 2 : workers > 8 ? 8 : workers ))
"$PY" -c "import xdist" 2>/dev/null && pytest_args+=(-n "$workers")
if selected tests; then
  stage tests 200 "$(after memcheck racecheck benchmarks)" "$PY" -m pytest "${pytest_args[@]}" tests
fi

if selected sanitize; then
  from=$(($(wc -l <"$LOG") + 1))
  for tool in memcheck racecheck; do
    # compute-sanitizer refuses the GPU of some runtimes (gVisor): memcheck fails saying so, and
    # racecheck would too, so the time goes to the benchmarks and the log says why
    if tail -n +"$from" "$LOG" | grep -q "Device not supported"; then
      log "=== compute-sanitizer $tool: SKIPPED (compute-sanitizer does not support this machine's GPU: \"Device not supported\")"
      SUMMARY+=("compute-sanitizer $tool: skipped, the tool does not support this machine")
      continue
    fi
    later=$([ $tool = memcheck ] && after racecheck benchmarks || after benchmarks)
    stage "compute-sanitizer $tool" 75 "$later" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool $tool --error-exitcode 9 "$PY" -m bench.sanitize
  done
fi

if selected benchmarks; then
  bench_left=$((TOTAL_S - $(elapsed) - 5))
  export XJFAST_BENCH_BUDGET_S=$((bench_left > 40 ? bench_left - 30 : 10))  # room to write the results
  stage benchmarks "$bench_left" 0 "$PY" -m bench.run "$OUT_DIR"
  tail -n 40 "$LOG"  # the benchmarks' summary table
  # the plots of the results as written last (a run cut off by its limit drew none after that)
  for results in "$OUT_DIR"/*.json; do
    [ -e "$results" ] && timeout 60 "$PY" -m bench.plots "$results" >>"$LOG" 2>&1
  done
fi
rm -f "$OUT_DIR"/*.tmp  # a results file cut off while being rewritten (its previous version stays)
log "=== summary ($(elapsed) s of $TOTAL_S s)"
for line in "${SUMMARY[@]}"; do log "  $line"; done
log "files in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
exit $overall
