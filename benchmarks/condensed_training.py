"""Condensed training in practice: one sparse setting trained twice, masked and condensed, against
dense, on a real preset, with the time of the training loop and what the two trainings differ by.

Three runs of the same preset, seed and steps, one after the other in this process:
``dense``; the sparse setting with ``train.condensed=off`` (the masked full-width model every
step); the same with ``train.condensed=on`` (the condensed network between mask updates,
``training/condensed.py``). Each run's loop time is read from its ``metrics.jsonl`` (the sum of
the logged intervals: steps, mask updates, optimizer and EMA; not the first stage, the final
sample grid or the checkpoints). Masked and condensed training compute the same function in a
different order of float operations, so their weights may part in the last bits and the
difference can grow over training; the script prints the largest weight difference and how many
pixels of the final sample grid differ (uint8), so that "the same samples" is measured, not
assumed. Give a trained first stage (a study's ``shared/<dataset>``) to skip training one:

    python benchmarks/condensed_training.py --first-stage docs/results/fast/shared/fashion-mnist
    python benchmarks/condensed_training.py --first-stage ... --set sparse.granularity=chase \
        --set sparse.sparsity=0.7 --set sparse.channel_sparsity=0.65
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparsediff.config import parse_override
from sparsediff.pipelines import load_config
from sparsediff.weights import load_weights
from sparsediff.workflows import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_throughput import machine  # noqa: E402  (the shared harness, next to this file)

TIED_CHANNEL_50 = {
    "sparse.method": "rigl",
    "sparse.sparsity": 0.5,
    "sparse.prune_ratio": 0.05,
    "sparse.granularity": "channel",
    "sparse.tie_stream": True,
}


def loop_seconds(run_dir: Path) -> float:
    """The training loop's time: every logged interval's steps over its rate."""
    total, last = 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "steps_per_s" in record:
            total += (record["step"] - last) / record["steps_per_s"]
            last = record["step"]
    return total


def run(preset: str, overrides: dict, run_dir: Path) -> float:
    cfg = load_config(preset, overrides, paths_from_cwd=True)
    train(cfg, run_dir)
    return loop_seconds(run_dir)


def compare(masked: Path, condensed: Path) -> tuple[float, int, int]:
    """Largest EMA weight difference, and differing / all uint8 values of the final grids."""
    a, b = load_weights(masked / "model.safetensors"), load_weights(condensed / "model.safetensors")
    weights = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    x, y = (np.asarray(Image.open(d / "samples.png"), dtype=np.int16) for d in (masked, condensed))
    return weights, int((x != y).sum()), x.size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ldm-fashion-mnist-wide")
    parser.add_argument("--first-stage", help="a study's shared/<dataset> folder (LDM)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the sparse setting (default: tied channel RigL at 50%%, p = 0.05)",
    )
    parser.add_argument("--out", help="where the three runs go (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sparse = dict(parse_override(o) for o in args.set) or TIED_CHANNEL_50
    common = {"train.steps": args.steps, "train.threads": args.threads, "seed": args.seed}
    common |= {"train.progress": False, "train.checkpoint_every": 0}
    if args.first_stage:
        shared = Path(args.first_stage).resolve()
        common |= {"autoencoder.dir": str(shared / "autoencoder")}
        common |= {"data.cache_dir": str(shared / "latents")}
    out = Path(args.out or tempfile.mkdtemp(prefix="condensed-training-"))
    settings = {
        "dense": {"sparse.method": "dense", "sparse.sparsity": 0.0},
        "masked": sparse | {"train.condensed": "off"},
        "condensed": sparse | {"train.condensed": "on"},
    }
    print(f"{args.preset}, {args.steps} steps, seed {args.seed}; {machine(torch.device('cpu'))}")
    print(f"sparse setting: {' '.join(f'{k}={v}' for k, v in sparse.items())}; runs in {out}")
    seconds = {name: run(args.preset, common | s, out / name) for name, s in settings.items()}
    for name, s in seconds.items():
        print(
            f"{name:>9}: {s:7.1f} s, {1000 * s / args.steps:6.1f} ms/step, "
            f"{seconds['dense'] / s:.2f}x dense"
        )
    weights, differ, size = compare(out / "masked", out / "condensed")
    print(
        f"masked vs condensed: largest EMA weight difference {weights:.2e}; final sample grid "
        f"{differ} of {size} uint8 values differ"
    )
    print(
        f"condensed training speed-up over masked: {seconds['masked'] / seconds['condensed']:.2f}x"
    )


if __name__ == "__main__":
    main()
