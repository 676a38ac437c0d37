"""Measured sampling time of a study's trained runs as they would be deployed, against dense.

For every finished cell of a study whose run is on this machine, one process loads the run's EMA
denoiser (masked) and deploys it: condensed (``models/condense``: dead channels, MLP neurons or
GRU units removed, same outputs) where its granularity leaves whole rows or units dead
(``channel``, ``unit``, ``chase``, ``fanin``) and condensing removes something, else the masked
network itself (an unstructured or dense one computes as much as dense). It finds the dense cell
of the same dataset and seed and times ``Pipeline.generate`` (the run's evaluation sampler and
steps, guidance and decoding included) on the same ``--batch`` sample seeds for both. Every round
times each network once in a rotating order, so machine load hits both; the numbers are medians
over ``--rounds`` and "x dense" is dense's median over the network's (> 1: faster). Where the
dense run's weights are not here, the masked network, which computes as much as dense, stands in
for it and the line says so (a small dense model, its own masked network, is then skipped). The
largest difference between condensed and masked samples (as uint8 images) is printed beside.
``--json STUDY/speed.json`` is what ``sparsediff report`` reads for the frontier (FID against
sampling time) and the summary.

    python benchmarks/study_speedup.py studies/evidence            # 1 thread, 5 rounds
    python benchmarks/study_speedup.py docs/results/dit --json docs/results/dit/speed.json
    python benchmarks/study_speedup.py docs/results/evidence --dataset kanjivg --channel-only
"""

from __future__ import annotations

import argparse
import json
import shlex
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


def _twin_here(study_dir: Path, twin: dict | None) -> bool:
    return twin is not None and _has_weights(study_dir / twin["run_dir"])


def _params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


CONDENSABLE = ("channel", "unit", "chase", "fanin")  # granularities that leave dead rows


def measure(
    study_dir: Path, batch: int, rounds: int, dataset: str | None = None, structured: bool = False
) -> list[dict]:
    """One record per finished cell whose run is on this machine (of ``dataset``; only the
    condensable ones with ``structured``); the dense cells measure themselves."""
    by_id = {r["id"]: r for r in read_results(study_dir / RESULTS_FILE)}  # the last line wins
    records = [r for r in by_id.values() if r.get("method")]
    dense = {
        (r["dataset"], r["seed"]): r
        for r in records
        if r.get("variant", "") == "" and r["method"] == "dense"
    }
    out = []
    for r in records:
        granularity = r.get("overrides", {}).get("sparse.granularity", "unstructured")
        if structured and granularity not in CONDENSABLE:
            continue
        if dataset is not None and r["dataset"] != dataset:
            continue
        if not _has_weights(study_dir / r["run_dir"]):
            print(f"{r['id']}: its run's weights are not here; skipped")
            continue
        twin = dense.get((r["dataset"], r["seed"]))
        if r["method"] == "dense" and twin is not r and not _twin_here(study_dir, twin):
            # a small dense model is its own masked network: without dense beside it, no ratio
            print(f"{r['id']}: the dense run of its seed is not here; skipped")
            continue
        out.append(_time_cell(study_dir, r, twin, batch, rounds))
    return out


def _time_cell(study_dir: Path, r: dict, twin: dict | None, batch: int, rounds: int) -> dict:
    pipeline, masked = load_run(study_dir / r["run_dir"], "cpu")
    granularity = r.get("overrides", {}).get("sparse.granularity", "unstructured")
    nets, condensed = {"masked": masked}, None
    if granularity in CONDENSABLE and r["method"] != "dense":
        condensed, plan = condense(masked)
        if plan:
            nets["condensed"] = condensed
    deployed = "condensed" if "condensed" in nets else "masked"
    if _twin_here(study_dir, twin) and twin["id"] != r["id"]:
        nets = {"dense": load_run(study_dir / twin["run_dir"], "cpu")[1], **nets}
    settings = pipeline.sampling(pipeline.cfg.eval)
    seeds = sample_seeds(pipeline.cfg.eval.seed, 0, batch)
    times: dict[str, list[float]] = {name: [] for name in nets}
    diff = None
    with torch.inference_mode():
        if deployed == "condensed":  # as images (uint8): sketches or tensors alike
            a = pipeline.to_images(pipeline.generate(masked, seeds, settings)).short()
            b = pipeline.to_images(pipeline.generate(condensed, seeds, settings)).short()
            diff = int((a - b).abs().max())
        for i in range(rounds):
            for name in list(nets)[i % len(nets) :] + list(nets)[: i % len(nets)]:
                tick = time.perf_counter()
                pipeline.generate(nets[name], seeds, settings)
                times[name].append(time.perf_counter() - tick)
    med = {name: statistics.median(t) for name, t in times.items()}
    base = "dense" if "dense" in nets else "masked"  # masked: dense's cost, zeros included
    record = {
        "id": r["id"],
        "dense_id": twin["id"] if base == "dense" else None,
        "baseline": base,
        "deployed": deployed,
        "seconds": med,
        "seconds_per_sample": med[deployed] / batch,
        "speedup": {name: med[base] / med[name] for name in nets},
        "params": {name: _params(net) for name, net in nets.items()},
        "max_abs_diff_condensed_vs_masked": diff,
        "sampler": f"{settings.sampler} {settings.steps} steps",
        "batch": batch,
        "rounds": rounds,
    }
    m, s = record["seconds"], record["speedup"]
    timed = ", ".join(f"{name} {m[name]:.2f} s ({s[name]:.2f}x)" for name in nets)
    same = "" if diff is None else f"; max |condensed - masked| {diff} of 255"
    print(f"{r['id']}: {timed} [x {base}]; params {record['params'][deployed]:,}{same}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", help="only this dataset's cells (default: all)")
    parser.add_argument("--json", type=Path, help="also write the records here")
    parser.add_argument(
        "--channel-only", action="store_true", help="only the cells that condense (dead rows)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    where = f"{machine(torch.device('cpu'))}, {args.threads} thread(s), torch {torch.__version__}"
    print(where)
    records = measure(args.study_dir, args.batch, args.rounds, args.dataset, args.channel_only)
    if not records:
        print("no finished cell with its weights here")
    for base in ("dense", "masked"):
        speedups = [
            r["speedup"]["condensed"]
            for r in records
            if r["baseline"] == base and "condensed" in r["speedup"]
        ]
        if speedups:
            mean = statistics.fmean(speedups)
            print(f"condensed sampling speed-up over {base}, {len(speedups)} run(s): {mean:.2f}x")
    if args.json:
        stamp = {
            "machine": where,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": shlex.join(["python", *sys.argv]),
        }
        args.json.write_text(json.dumps({**stamp, "cells": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()
