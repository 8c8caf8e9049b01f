#!/usr/bin/env bash
# Sets up everything on a fresh machine: the dataset, a virtual environment in .venv, and fxshift
# installed in it (which builds the native kernels with CMake). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Fashion-MNIST from Debian's package (offline, MIT); without it fxshift.data falls back to torchvision.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "setup: could not install dataset-fashion-mnist; the demo will try torchvision's download"
fi

# onnxruntime's C/C++ headers for the custom-op plugin (the wheel ships none).
if [ -x scripts/fetch_ort_headers.sh ]; then
  scripts/fetch_ort_headers.sh || echo "setup: onnxruntime headers unavailable; the plugin will not be built"
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c 'import fxshift, torch; print("setup: done, fxshift", fxshift.__version__, "torch", torch.__version__)' 
