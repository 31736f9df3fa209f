#!/usr/bin/env bash
# Makes `cargo build --features cuda` work without network access at build time.
#
# cubecl-cuda always compiles cubecl-llvm (its LLVM -> PTX backend), whose build dependency
# tracel-llvm-bundler downloads an LLVM 23.1 bundle from GitHub releases into
# ${XDG_DATA_HOME:-~/.local/share}/tracel/tracel-llvm-23.1.0-4, unless that directory already holds
# `.tracel-llvm-installed`. PyPI ships a matching static LLVM 23.1 SDK (with the NVPTX target in
# the -extra-targets wheel); this script installs it with pip and links it there.
# No CUDA toolkit is needed to build: cudarc loads libcuda, nvrtc and nccl at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
SDK_ROOT="${FLAVA_LLVM_DIR:-$HOME/.cache/flava-llvm}"
D="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-23.1.0-4"
if [ -f "$D/.tracel-llvm-installed" ]; then
  echo "LLVM for cubecl already in $D"
  exit 0
fi
if [ ! -x "$SDK_ROOT/mlc_llvm_static/static/bin/llvm-config" ]; then
  if ! "$PY" -m pip --version >/dev/null 2>&1; then
    # A Python without pip (Debian's own): a venv just for the download.
    python3 -m venv "$SDK_ROOT.venv"
    PY="$SDK_ROOT.venv/bin/python"
  fi
  "$PY" -m pip install --quiet --target "$SDK_ROOT" \
    mlc-llvm-static==23.1.1.post0 mlc-llvm-static-extra-targets==23.1.1.post0
fi
SDK="$SDK_ROOT/mlc_llvm_static/static"
mkdir -p "$D"
for x in bin lib include share; do ln -sfn "$SDK/$x" "$D/$x"; done
touch "$D/.tracel-llvm-installed"
echo "LLVM 23.1 SDK from PyPI linked into $D"
