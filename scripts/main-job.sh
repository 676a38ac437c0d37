#!/usr/bin/env bash
# The main job: set up, run the quick study on the built-in data (dense, Static, RigL, MagRan at
# 50% sparsity; Latent Diffusion on Fashion-MNIST, ChiroDiff on KanjiVG), write its report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
OUT="${OUT:-studies/quick}"
"$VENV/bin/sparsediff" study quick --out "$OUT"
"$VENV/bin/sparsediff" report "$OUT"
