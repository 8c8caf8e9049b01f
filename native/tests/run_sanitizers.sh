#!/usr/bin/env bash
# Builds libfxshift and its C tests with AddressSanitizer + UndefinedBehaviorSanitizer
# (-DFXSHIFT_SANITIZE=ON) into build/sanitize and runs them with CTest.
# Every supported ISA is exercised (the test program forces each in turn).
# Exit status: nonzero if the build or any test fails or a sanitizer reports.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build="${FXSHIFT_SANITIZE_BUILD_DIR:-$root/build/sanitize}"

generator=()
if command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi

cmake -S "$root" -B "$build" "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DFXSHIFT_SANITIZE=ON \
  -DFXSHIFT_BUILD_TESTS=ON \
  -DFXSHIFT_BUILD_CUDA=OFF
cmake --build "$build" --parallel

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
ctest --test-dir "$build" --output-on-failure
echo "sanitizer run passed ($build)"
