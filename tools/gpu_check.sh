#!/usr/bin/env bash
# The CUDA tests and the GPU benchmark in one call; the tables are printed last.
#
#   bash tools/gpu_check.sh                 # on a CUDA machine (about 20 minutes on an H100/H200)
#   bash tools/gpu_check.sh --dry-run       # on CPU: the test file collects (and skips), the benchmark's dry run
#   bash tools/gpu_check.sh --tests-only    # or --bench-only [benchmark_gpu.py args]: one half, for
#                                           # machines lent by the 10-minute command
#
# Uses the machine's python/torch as they are (PYTHON=... to choose one); needs no network: the
# package runs from this checkout through PYTHONPATH, nothing is installed. Logs go to $LOG_DIR.
# Exit status: that of the tests, or the benchmark's when the tests passed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TIMM_NAT_AUTOREGISTER=0  # the import hook is not installed here; the scripts import timm_nat
LOG_DIR=${LOG_DIR:-${TMPDIR:-/tmp}/timm_nat_gpu_check}
mkdir -p "$LOG_DIR"

DRY=0 RUN_TESTS=1 RUN_BENCH=1 BENCH_ARGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --tests-only) RUN_BENCH=0 ;;
    --bench-only) RUN_TESTS=0 ;;
    *) BENCH_ARGS+=("$arg") ;;
  esac
done

if [[ $DRY == 1 ]]; then
  TEST_ARGS=(-m cuda -rs)
  BENCH_ARGS+=(--dry-run)
  BENCH_TIMEOUT=3600  # CPU compilation of the flex cells: minutes on a busy machine
else
  if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run on CPU" >&2
    exit 2
  fi
  TEST_ARGS=(-m cuda -rs --durations=10)
  BENCH_TIMEOUT=720  # with the tests' 480 s: about 20 minutes in all
fi

"$PYTHON" -c 'import torch, timm; print(f"torch {torch.__version__}, timm {timm.__version__}, cuda {torch.version.cuda}, "
  f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")'
"$PYTHON" -c 'import natten; print("natten", natten.__version__)' 2>/dev/null || echo "natten: not installed (its columns and tests are skipped)"

tests_rc=0 bench_rc=0
if [[ $RUN_TESTS == 1 ]]; then
  echo "== CUDA tests =="
  timeout 480 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py "${TEST_ARGS[@]}" 2>&1 | tee "$LOG_DIR/tests.log"
  tests_rc=${PIPESTATUS[0]}
fi
if [[ $RUN_BENCH == 1 ]]; then
  echo "== benchmark =="
  timeout "$BENCH_TIMEOUT" "$PYTHON" tools/benchmark_gpu.py "${BENCH_ARGS[@]}" > "$LOG_DIR/benchmark.md" 2> "$LOG_DIR/benchmark.err"
  bench_rc=$?
  tail -n 5 "$LOG_DIR/benchmark.err"
fi

echo
echo "== results =="
if [[ $RUN_TESTS == 1 ]]; then grep -E "passed|failed|skipped|error" "$LOG_DIR/tests.log" | tail -n 1; fi
if [[ $RUN_BENCH == 1 ]]; then cat "$LOG_DIR/benchmark.md"; fi
echo "tests exit $tests_rc, benchmark exit $bench_rc (logs in $LOG_DIR/)"
if [[ $tests_rc -ne 0 ]]; then exit "$tests_rc"; fi
exit "$bench_rc"
