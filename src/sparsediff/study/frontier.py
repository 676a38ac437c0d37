"""The frontier a user chooses a setting from: quality against measured sampling time.

``benchmarks/study_speedup.py STUDY --json STUDY/speed.json`` times every finished run as it
would be deployed (condensed where its structure allows) beside the dense run of its seed. This
module joins those times with the study's FIDs: per setting the FID over seeds (for Latent
Diffusion the denoiser-only FID against the first stage's reconstructions, beside the image
FID) and the sampling time per sample, plotted one point per setting (:func:`plot_frontier`) and
written as ``summary.json`` entries (:func:`summary_entries`); ``study.plots.plot_frontier``
draws them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsediff.io import read_json
from sparsediff.study.stats import Setting, Stat, group_settings, row_label

SPEED_FILE = "speed.json"
RECON = "metrics_vs_reconstructions"


@dataclass(frozen=True)
class Point:
    """One setting of one dataset on the frontier."""

    setting: Setting
    fid: Stat  # the denoiser's: against the reconstructions where there is a first stage
    fid_images: Stat  # against the images
    denoiser_only: bool  # ``fid`` is against the first stage's reconstructions
    seconds: Stat  # sampling time per sample, deployed (condensed where it condenses)
    speedup: Stat  # over the dense run of the same seed, timed beside it
    params: int  # of the dense model
    params_deployed: int


def read_speed(study_dir: Path) -> dict[str, Any] | None:
    """The study's ``speed.json`` (None without one)."""
    path = Path(study_dir) / SPEED_FILE
    return read_json(path) if path.exists() else None


def frontier(records: list[dict], speed: dict[str, Any]) -> dict[str, list[Point]]:
    """Per dataset, a point for every setting with timed runs."""
    timed = {cell["id"]: cell for cell in speed.get("cells", [])}
    out: dict[str, list[Point]] = {}
    for ds, settings in group_settings(records).items():
        for s in settings:
            cells = [timed[r["id"]] for r in s.records if r["id"] in timed]
            if not cells:
                continue
            recon = s.metric("fid", RECON)
            deployed = [c["params"][c["deployed"]] for c in cells]
            dense = [c["params"].get("dense", c["params"]["masked"]) for c in cells]
            out.setdefault(ds, []).append(
                Point(
                    setting=s,
                    fid=recon if recon.n else s.metric("fid"),
                    fid_images=s.metric("fid"),
                    denoiser_only=bool(recon.n),
                    seconds=Stat.of(c["seconds_per_sample"] for c in cells),
                    speedup=Stat.of(c["speedup"][c["deployed"]] for c in cells),
                    params=int(statistics.median(dense)),
                    params_deployed=int(statistics.median(deployed)),
                )
            )
    return out


def setting_name(s: Setting) -> str:
    """A setting's name on the frontier (a baseline without its 0%)."""
    return row_label(*s.row) if s.sparsity == 0 else s.label


def summary_entries(
    records: list[dict], speed: dict[str, Any], command: str
) -> list[dict[str, Any]]:
    """``summary.json``: one entry per setting with timed runs (``docs/results/fast/``)."""
    points = frontier(records, speed)
    out = []
    for ds, dataset_points in points.items():
        dense = next((p for p in dataset_points if p.setting.method == "dense"), None)
        for p in dataset_points:
            first = p.setting.records[0]
            recon = p.denoiser_only
            entry = {
                "pipeline": first.get("pipeline"),
                "dataset": ds,
                "setting": setting_name(p.setting),
                "params": {"dense": p.params, "condensed": p.params_deployed},
                "fid": _per_seed(p.setting, RECON if recon else "metrics"),
                "fid_dense": _per_seed(dense.setting, RECON if recon else "metrics")
                if dense
                else None,
                "speedup": p.speedup.mean,
                "seconds_per_sample": p.seconds.mean,
                "machine": speed.get("machine"),
                "date": speed.get("date"),
                "command": command,
            }
            if recon:
                entry["fid_images"] = _per_seed(p.setting, "metrics")
            out.append(entry)
    return out


def _per_seed(s: Setting, source: str) -> list[float | None]:
    ordered = sorted(s.records, key=lambda r: r.get("seed", 0))
    return [(r.get(source) or {}).get("fid") for r in ordered]
