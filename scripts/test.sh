#!/usr/bin/env bash
# The whole test run: native tests under AddressSanitizer and UndefinedBehaviorSanitizer, the CUDA
# compile check, the Python suite (without the slow tests unless FXSHIFT_TEST_MARKERS says
# otherwise), and the benchmarks in their short mode.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

echo "== native tests (ASan + UBSan)"
bash native/tests/run_sanitizers.sh

echo "== onnxruntime plugin tests (ASan + UBSan)"
bash native/ort/run_asan_tests.sh

if command -v nvcc >/dev/null 2>&1; then
  echo "== CUDA kernels: compiled by the package build (nvcc found)"
  ls .venv/lib/python3*/site-packages/fxshift/_native/libfxshift_cuda.so
fi

echo "== python tests (slow ones too with: FXSHIFT_TEST_MARKERS= bash scripts/test.sh)"
python -m pytest tests -q --durations=15 -m "${FXSHIFT_TEST_MARKERS-not slow}" "$@"

echo "== benchmarks (short mode)"
FXSHIFT_BENCH_QUICK=1 python -m pytest benchmarks -q --benchmark-columns=median,rounds \
  --benchmark-json=build/benchmarks.json -s
