#!/usr/bin/env bash
# Puts onnxruntime's C/C++ headers (which the onnxruntime wheel does not ship) in
# third_party/onnxruntime-headers/include, for the custom-op plugin in native/ort.
# Order: $ONNXRUNTIME_INCLUDE_DIR, the system, else Debian trixie's libonnxruntime-dev package,
# downloaded with apt-get (a temporary sources file using this machine's Debian mirror) and
# unpacked with dpkg -x; nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=third_party/onnxruntime-headers
header=onnxruntime_cxx_api.h

have() { [ -f "$1/$header" ] || [ -f "$1/onnxruntime/$header" ]; }
if [ -n "${ONNXRUNTIME_INCLUDE_DIR:-}" ] && have "$ONNXRUNTIME_INCLUDE_DIR"; then
  echo "onnxruntime headers: $ONNXRUNTIME_INCLUDE_DIR (ONNXRUNTIME_INCLUDE_DIR)"; exit 0
fi
for dir in /usr/include /usr/local/include /usr/include/onnxruntime; do
  if have "$dir"; then echo "onnxruntime headers: $dir (system)"; exit 0; fi
done
if have "$dest/include"; then echo "onnxruntime headers: $dest/include"; exit 0; fi

command -v apt-get >/dev/null && command -v dpkg >/dev/null \
  || { echo "fetch_ort_headers: no apt-get/dpkg; set ONNXRUNTIME_INCLUDE_DIR" >&2; exit 1; }
mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]*debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
  | grep -v security | awk 'NR==1 {print $2}' || true)
mirror=${mirror:-http://deb.debian.org/debian}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial" "$work/sources.list.d"
cat > "$work/sources.list.d/trixie.sources" <<SRC
Types: deb
URIs: $mirror
Suites: trixie
Components: main
Trusted: yes
SRC
opts=(-o Dir::Etc::sourcelist=/dev/null -o Dir::Etc::sourceparts="$work/sources.list.d"
      -o Dir::State::Lists="$work/lists" -o Dir::Cache::archives="$work/archives"
      -o Debug::NoLocking=1 -o APT::Sandbox::User=root -o Acquire::Check-Valid-Until=false)
apt-get "${opts[@]}" -q update >/dev/null
(cd "$work" && apt-get "${opts[@]}" -q download libonnxruntime-dev >/dev/null)
deb=$(ls "$work"/libonnxruntime-dev_*.deb | head -n1)
dpkg -x "$deb" "$work/root"
inc=$(dirname "$(find "$work/root" -name "$header" | head -n1)")
mkdir -p "$dest/include"
cp -r "$inc"/. "$dest/include/"
echo "onnxruntime headers: $dest/include (from $(basename "$deb"))"
