#!/usr/bin/env bash
# The whole test run: native tests under AddressSanitizer and UndefinedBehaviorSanitizer, the CUDA
# compile check, the Python suite (slow tests included), and the benchmarks in their short mode.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

echo "== native tests (ASan + UBSan)"
bash native/tests/run_sanitizers.sh

echo "== python tests"
python -m pytest tests -q --durations=15 "$@"

echo "== benchmarks (short mode)"
FXSHIFT_BENCH_QUICK=1 python -m pytest benchmarks -q -p no:randomly --benchmark-columns=median,rounds \
  --benchmark-json=build/benchmarks.json -s
