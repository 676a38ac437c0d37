#!/usr/bin/env bash
# The main job: set up, then the quick study on the built-in data (dense and RigL at 50%; Latent
# Diffusion on Fashion-MNIST, ChiroDiff on KanjiVG), one process per dataset so that both cores
# work, then its report (sample grids first). A demonstration of what the project does, in
# minutes; the evidence is docs/results/evidence/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
OUT="${OUT:-studies/quick}"
# one torch thread per process: two processes on two cores
"$VENV/bin/sparsediff" study quick --out "$OUT" --threads 1 --cells 'fashion-mnist/*' &
images=$!
"$VENV/bin/sparsediff" study quick --out "$OUT" --threads 1 --cells 'kanjivg/*' &
sketches=$!
status=0
wait "$images" || status=$?
wait "$sketches" || status=$?
[ "$status" -eq 0 ] || { echo "main-job: a study process failed (exit $status)" >&2; exit "$status"; }
"$VENV/bin/sparsediff" report "$OUT"
