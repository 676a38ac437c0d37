"""Measured sampling speed-up of a study's trained channel-sparse runs, condensed, against dense.

For every finished cell of a study whose run trained with ``sparse.granularity = "channel"``,
one process loads the run's EMA denoiser (masked), condenses it (``models/condense.py``: the
dead channels removed, same outputs) and finds the dense cell of the same dataset and seed. It
then times ``Pipeline.generate`` (the run's evaluation sampler and steps, decoding included) on
the same ``--batch`` sample seeds for the three networks: dense, masked, condensed. Every round
times each network once in a rotating order, so machine load hits all of them; the numbers are
medians over ``--rounds`` and "x dense" is dense's median over the network's (> 1: faster).
Where the dense run's weights are not on this machine (a study continued elsewhere), the masked
network, which computes as much as dense, stands in for it and the line says so. The largest
difference between the condensed and the masked samples (as uint8 images) is printed beside.

    python benchmarks/study_speedup.py studies/evidence            # 1 thread, 5 rounds
    python benchmarks/study_speedup.py docs/results/evidence --json out.json
    python benchmarks/study_speedup.py docs/results/evidence --dataset kanjivg
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsediff.models.condense import condense
from sparsediff.pipelines.base import sample_seeds
from sparsediff.study.results import RESULTS_FILE, read_results
from sparsediff.workflows.run import load_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_throughput import machine  # noqa: E402  (the shared harness, next to this file)


def _has_weights(run_dir: Path) -> bool:
    return any(run_dir.glob("*.safetensors")) or (run_dir / "checkpoint.pt").exists()


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def measure(study_dir: Path, batch: int, rounds: int, dataset: str | None = None) -> list[dict]:
    """One record per finished channel-sparse cell whose run is on this machine (of ``dataset``)."""
    by_id = {r["id"]: r for r in read_results(study_dir / RESULTS_FILE)}  # the last line wins
    records = [r for r in by_id.values() if r.get("method")]
    dense = {
        (r["dataset"], r["seed"]): r
        for r in records
        if r.get("variant", "") == "" and r["method"] == "dense"
    }
    out = []
    for r in records:
        if r.get("overrides", {}).get("sparse.granularity") != "channel":
            continue
        if dataset is not None and r["dataset"] != dataset:
            continue
        if not _has_weights(study_dir / r["run_dir"]):
            print(f"{r['id']}: its run's weights are not here; skipped")
            continue
        twin = dense.get((r["dataset"], r["seed"]))
        pipeline, masked = load_run(study_dir / r["run_dir"], "cpu")
        condensed, _ = condense(masked)
        nets = {"masked": masked, "condensed": condensed}
        if twin is not None and _has_weights(study_dir / twin["run_dir"]):
            nets = {"dense": load_run(study_dir / twin["run_dir"], "cpu")[1], **nets}
        settings = pipeline.sampling(pipeline.cfg.eval)
        seeds = sample_seeds(pipeline.cfg.eval.seed, 0, batch)
        times: dict[str, list[float]] = {name: [] for name in nets}
        with torch.inference_mode():
            # as images (uint8): ChiroDiff generates sketches, Latent Diffusion tensors
            a = pipeline.to_images(pipeline.generate(masked, seeds, settings)).short()
            b = pipeline.to_images(pipeline.generate(condensed, seeds, settings)).short()
            for i in range(rounds):
                names = list(nets)[i % len(nets) :] + list(nets)[: i % len(nets)]
                for name in names:
                    tick = time.perf_counter()
                    pipeline.generate(nets[name], seeds, settings)
                    times[name].append(time.perf_counter() - tick)
        med = {name: statistics.median(t) for name, t in times.items()}
        base = "dense" if "dense" in nets else "masked"  # masked: dense's cost, zeros included
        out.append(
            {
                "id": r["id"],
                "dense_id": twin["id"] if base == "dense" else None,
                "baseline": base,
                "seconds": med,
                "speedup": {name: med[base] / med[name] for name in nets},
                "params": {name: _params(net) for name, net in nets.items()},
                "max_abs_diff_condensed_vs_masked": int((a - b).abs().max()),
                "sampler": f"{settings.sampler} {settings.steps} steps",
                "batch": batch,
                "rounds": rounds,
            }
        )
        m, s = out[-1]["seconds"], out[-1]["speedup"]
        timed = ", ".join(f"{name} {m[name]:.2f} s ({s[name]:.2f}x)" for name in nets)
        print(
            f"{r['id']}: {timed} [x {base}]; params {out[-1]['params']['condensed']:,} of "
            f"{out[-1]['params'][base]:,}; "
            f"max |condensed - masked| {out[-1]['max_abs_diff_condensed_vs_masked']} of 255"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", help="only this dataset's cells (default: all)")
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{machine(torch.device('cpu'))}, {args.threads} thread(s), torch {torch.__version__}")
    records = measure(args.study_dir, args.batch, args.rounds, args.dataset)
    if not records:
        print("no finished channel-sparse cell with its weights here")
    for base in ("dense", "masked"):
        speedups = [r["speedup"]["condensed"] for r in records if r["baseline"] == base]
        if speedups:
            mean = statistics.fmean(speedups)
            print(
                f"condensed channel sampling speed-up over {base}, {len(speedups)} run(s): "
                f"{mean:.2f}x"
            )
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")


if __name__ == "__main__":
    main()
