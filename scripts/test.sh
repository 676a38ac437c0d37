#!/usr/bin/env bash
# The test command: set up everything, lint, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${VENV:-.venv}"
"$VENV/bin/ruff" check src tests benchmarks
"$VENV/bin/ruff" format --check src tests benchmarks
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
