#!/usr/bin/env bash
# The test command: set up everything, lint, then run the whole suite; then the float-sensitive
# tests (marker "kernels") twice more, under the CPU kernels of other machines: AVX2 only (an AMD
# EPYC, most laptops) and no vector extensions at all. Another machine's floats differ in the last
# bits; these runs catch a comparison that holds only on this one (docs/guarantees.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
"$VENV/bin/ruff" check src tests benchmarks
"$VENV/bin/ruff" format --check src tests benchmarks
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
if [ $# -eq 0 ]; then  # the whole suite was asked for: the other kernels too
  for kernels in "avx2 AVX2 AVX2" "default SSE41 SSE4_2"; do
    read -r aten onednn mkl <<<"$kernels"
    echo "float-sensitive tests under ATEN_CPU_CAPABILITY=$aten ONEDNN_MAX_CPU_ISA=$onednn MKL_ENABLE_INSTRUCTIONS=$mkl"
    ATEN_CPU_CAPABILITY=$aten ONEDNN_MAX_CPU_ISA=$onednn MKL_ENABLE_INSTRUCTIONS=$mkl \
      "$VENV/bin/python" -m pytest -p no:cacheprovider -m kernels
  done
fi
