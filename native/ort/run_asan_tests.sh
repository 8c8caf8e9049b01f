#!/usr/bin/env bash
# Builds libfxshift and the onnxruntime plugin libfxshift_ort with AddressSanitizer + UBSan
# (-DFXSHIFT_SANITIZE=ON) into build/sanitize-ort and runs the plugin's crafted-file tests
# (tests/test_onnx_robustness.py: valid nodes vs onnxruntime's Conv, malformed nodes, 8 threads)
# and tests/test_ort_scale_pool.py (the scale input, kernels on onnxruntime's intra-op pool)
# in a Python that preloads the sanitizer runtimes. The test imports only numpy, onnx and
# onnxruntime (no torch, --noconftest), so everything instrumented is fxshift's own code.
# Exit status: nonzero if the build or a test fails or a sanitizer reports. Without onnxruntime's
# headers the plugin cannot be built: the script says so and exits 0 (FXSHIFT_REQUIRE_ORT=1: 1).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build="${FXSHIFT_ORT_ASAN_BUILD_DIR:-$root/build/sanitize-ort}"
python="${PYTHON:-python}"

generator=()
if command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi

cmake -S "$root" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DFXSHIFT_SANITIZE=ON \
  -DFXSHIFT_BUILD_TESTS=OFF \
  -DFXSHIFT_BUILD_CUDA=OFF \
  -DFXSHIFT_BUILD_ORT=ON | grep -E "fxshift|Error|error" || true
if ! cmake --build "$build" --parallel --target help | grep -q "fxshift_ort"; then
  echo "run_asan_tests: the onnxruntime plugin was not configured (onnxruntime headers not found; run"
  echo "scripts/fetch_ort_headers.sh or set ONNXRUNTIME_INCLUDE_DIR); plugin sanitizer tests SKIPPED"
  [ "${FXSHIFT_REQUIRE_ORT:-0}" = "1" ] && exit 1
  exit 0
fi
cmake --build "$build" --parallel --target fxshift_ort

lib="$build/native/libfxshift_ort.so"
cc="${CC:-gcc}"
preload="$("$cc" -print-file-name=libasan.so):$("$cc" -print-file-name=libubsan.so)"

# Python and onnxruntime are not instrumented: no leak check (the interpreter keeps its arenas),
# no new/delete pairing check across the uninstrumented onnxruntime.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:alloc_dealloc_mismatch=0:detect_odr_violation=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
cd "$root"
LD_PRELOAD="$preload" FXSHIFT_ORT_PLUGIN="$lib" FXSHIFT_NATIVE_DIR="$build/native" \
  "$python" -m pytest tests/test_onnx_robustness.py tests/test_ort_scale_pool.py -q --noconftest -p no:cacheprovider -p no:randomly "$@"
echo "plugin sanitizer run passed ($lib)"
