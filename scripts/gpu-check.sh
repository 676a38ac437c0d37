#!/usr/bin/env bash
# Every GPU measurement the project documents, on a machine with one CUDA GPU, in under eight
# minutes, most important first: a short bf16 channel-sparse training run with resume (ldm-tiny
# through the CLI), that run condensed on the GPU (same samples as masked), the CUDA tests
# (2:4 semi-structured kernels), the real speed-up benchmark (condensed channel / 2:4 kernels,
# ldm4 bf16), the engine overhead, and the LDM and ChiroDiff training throughput in bf16. Each
# step has its own time cap (`timeout`) and the whole run a deadline, so a slow or hung step
# cannot eat the budget: a capped step shows exit code 124, one past the deadline "skipped".
#
# It prepares itself on a bare machine: the Python is $PYTHON, else the venv's (.venv, made by
# scripts/setup.sh), else the machine's python3 (a lent GPU machine's holds a CUDA torch). Wheels
# in .whl/ are installed with --target into a folder of their own (no network, nothing else
# touched), and the project runs from src/ through PYTHONPATH: nothing to build.
#
# The exact call on a lent GPU machine (device tool), prepared here once:
#   bash scripts/gpu-wheels.sh          # diffusers & co. into .whl/ (git-ignored), ~6.5 MB
#   run(command="bash scripts/gpu-check.sh", carry=[".whl"], timeout_s=560)
# Rehearsed on a CPU machine with a bare Python that lacks those packages:
#   PYTHON=/path/to/bare/python bash scripts/gpu-check.sh   # ends: "no CUDA GPU", exit code 3
#
# Writes one Markdown summary, $OUT/gpu-check.md if OUT is set, else ./gpu-check.md (card,
# torch version, each step's command, exit code, time and output tail), and the full logs in
# gpu-check-logs/ next to it. Exit codes: 3 no CUDA GPU, 4 packages missing (the summary names
# them), else 0 (a failed step shows in the summary).
#
#   bash scripts/gpu-check.sh
#   OUT=/tmp/out bash scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-${VENV:-.venv}/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
SUMMARY="${OUT:-.}/gpu-check.md"
LOGS="$(dirname "$SUMMARY")/gpu-check-logs"
BUDGET_S=450   # all steps together: 8 minutes less start-up, kill grace (10 s) and summary
START=$(date +%s)
mkdir -p "$LOGS"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

md() { printf '%s\n' "$@" >>"$SUMMARY"; }

{
  echo "# GPU check"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$SUMMARY"

md "- python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])' 2>&1))"
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels: into a folder of their own
  SITE="$WORK/site"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    .whl/*.whl >"$LOGS/wheels.log" 2>&1; then
    md "- **not run**: the wheels in .whl/ did not install (gpu-check-logs/wheels.log)"
    echo "gpu-check: the wheels in .whl/ did not install; see $LOGS/wheels.log" >&2
    exit 4
  fi
  md "- installed from .whl/: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
fi
export PYTHONPATH="$PWD/src${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
NEEDED="torch numpy PIL safetensors tqdm diffusers scipy matplotlib huggingface_hub pytest"
MISSING=$("$PY" -c "import importlib.util as u, sys; print(' '.join(n for n in sys.argv[1:] if u.find_spec(n) is None))" $NEEDED 2>&1)
if [ -n "$MISSING" ]; then
  md "- **not run**: missing Python packages: $MISSING (carry their wheels: scripts/gpu-wheels.sh)"
  echo "gpu-check: missing Python packages: $MISSING; see the header of this script" >&2
  exit 4
fi
if ! "$PY" -c "import sparsediff.pipelines" >"$LOGS/import.log" 2>&1; then
  md "- **not run**: sparsediff does not import here: $(tail -n 1 "$LOGS/import.log")"
  echo "gpu-check: sparsediff does not import; see $LOGS/import.log" >&2
  exit 4
fi
md "- torch: $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"
if ! command -v nvidia-smi >/dev/null 2>&1 \
  || ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null
then
  md "- **not run**: no CUDA GPU visible (nvidia-smi missing or torch.cuda.is_available() is False)"
  echo "gpu-check: no CUDA GPU here (nvidia-smi or torch.cuda); nothing measured. Summary: $SUMMARY" >&2
  exit 3
fi
md "- card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n 1)"
md "- budget: ${BUDGET_S} s for all steps; each step capped (exit code 124 = hit its cap)" ""
ROWS="$WORK/rows.md" DETAILS="$WORK/details.md"
: >"$ROWS"
: >"$DETAILS"

# step NAME CAP_S COMMAND...: run with the smaller of its cap and what is left of the budget.
step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((BUDGET_S - ($(date +%s) - START)))
  local limit=$((cap < left ? cap : left))
  local log="$LOGS/$name.log" rc=skipped seconds=0 t0
  if [ "$limit" -lt 20 ]; then
    echo "skipped: out of time ($left s left of ${BUDGET_S} s)" >"$log"
  else
    echo "gpu-check: $name (cap ${limit} s)" >&2
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
    rc=$?
    seconds=$(($(date +%s) - t0))
  fi
  echo "| $name | $rc | $seconds |" >>"$ROWS"
  {
    echo "## $name"
    echo
    echo "\`$*\` (cap ${limit} s): exit code $rc, ${seconds} s"
    echo
    echo '```'
    tail -n 40 "$log"
    echo '```'
    echo
  } >>"$DETAILS"
}

# Data for ldm-tiny: the built-in Fashion-MNIST files, else 96 synthetic 28x28 IDX images.
DATA=/usr/share/datasets/fashion-mnist
if [ ! -f "$DATA/train-images-idx3-ubyte.gz" ]; then
  DATA="$WORK/fmnist"
  "$PY" - "$DATA" <<'EOF'
import gzip, struct, sys
from pathlib import Path
import numpy as np
root = Path(sys.argv[1]); root.mkdir(parents=True)
rng = np.random.default_rng(0)
for prefix, n in (("train", 96), ("t10k", 24)):
    images = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        y, x = rng.integers(4, 14, size=2)
        images[i, y:y + 10, x:x + 6 + i % 5] = 200 + i % 50
    for kind, array in (("images-idx3", images), ("labels-idx1", np.arange(n, dtype=np.uint8) % 10)):
        header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
        (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
EOF
fi
TRAIN=("$PY" -m sparsediff.cli train ldm-tiny --run-dir "$WORK/run" --device cuda --precision bf16
  --set "data.path=$DATA" --set sparse.granularity=channel --set train.progress=false)
# The trained channel-sparse run condensed on the GPU: same samples (fp32, TF32 off) as masked.
cat >"$WORK/condense_check.py" <<'EOF'
import sys, torch
from sparsediff.diffusion.samplers import SamplingSettings
from sparsediff.models.condense import condense
from sparsediff.pipelines.run import load_run
device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
pipeline, model = load_run(sys.argv[1], device=device)
condensed, plan = condense(model)
kinds = [e["kind"] for e in plan.values()]
print("plan:", {k: kinds.count(k) for k in set(kinds)}, "params",
      sum(p.numel() for p in model.parameters()), "->", sum(p.numel() for p in condensed.parameters()))
settings = SamplingSettings("ddim", steps=10)
want = pipeline.generate(model, list(range(8)), settings)
got = pipeline.generate(condensed.eval(), list(range(8)), settings)
diff = (got - want).abs().max().item()
print(f"max |condensed - masked| over 8 decoded samples (fp32, {device}): {diff:.2e}")
sys.exit(0 if diff < 1e-3 else 1)
EOF

step train-bf16-stop-at-3 60 "${TRAIN[@]}" --set train.stop_at=3
step train-bf16-resume 45 "${TRAIN[@]}" --resume
step condense-check 45 "$PY" "$WORK/condense_check.py" "$WORK/run"
step cuda-tests 60 "$PY" -m pytest -p no:cacheprovider -q -rs tests/test_semistructured.py \
  tests/test_condense.py
step real-speedup 150 "$PY" benchmarks/real_speedup.py --device cuda
step engine-overhead 45 "$PY" benchmarks/engine_overhead.py --device cuda --dtype bfloat16 --batch 32
step ldm-throughput 100 "$PY" benchmarks/ldm_throughput.py --device cuda --precision bf16 \
  --update-interval 5 --steps 10 --rounds 3 --warmup 5
step chirodiff-throughput 50 "$PY" benchmarks/chirodiff_throughput.py --device cuda \
  --precision bf16 --steps 20 --rounds 3

md "| step | exit code | seconds |" "|---|---|---|"
cat "$ROWS" >>"$SUMMARY"
md "" "total: $(($(date +%s) - START)) s" ""
cat "$DETAILS" >>"$SUMMARY"
echo "gpu-check: wrote $SUMMARY" >&2
