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
from sparsediff.study.stats import (
    ALPHA,
    REL_TOL,
    Setting,
    Stat,
    group_settings,
    row_label,
    welch_p,
    welch_p_above,
)

SPEED_FILE = "speed.json"
RECON = "metrics_vs_reconstructions"
EQUAL_TIME = "small-dense-time"  # the variant of the small dense model of equal sampling time
SPEEDUP_TARGET = {"chirodiff": 1.3}  # the fast-and-good targets; every other pipeline: 1.5


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


@dataclass(frozen=True)
class Target:
    """A sparse setting against the fast-and-good targets: sampling at least ``needed`` times
    as fast as dense; an FID not worse than dense's (a one-sided Welch test at 5% finds no
    worsening, *and* the mean is within +5%); and an FID below the small dense model's of
    equal sampling time beyond the noise (a two-sided Welch test at 5%). Untested (one seed on
    either side) is never met."""

    point: Point
    needed: float
    dense: Stat
    p_worse: float | None  # one-sided: the FID above dense's
    small: Stat | None  # the equal-time small dense model's FID, where the study has one
    p_small: float | None  # two-sided, against it

    @property
    def fast(self) -> bool:
        return self.point.speedup.mean is not None and self.point.speedup.mean >= self.needed

    @property
    def change(self) -> float:
        """The FID's mean against dense's, as a fraction (+0.05: 5% worse)."""
        return self.point.fid.mean / self.dense.mean - 1

    @property
    def not_worse(self) -> bool:
        return self.p_worse is not None and self.p_worse >= ALPHA and self.change <= REL_TOL

    @property
    def beats_small(self) -> bool:
        lower = self.small is not None and self.point.fid.mean < self.small.mean
        return self.p_small is not None and self.p_small < ALPHA and lower

    @property
    def missed(self) -> list[str]:
        """The parts not met, in words (empty: the target is met)."""
        return [
            word
            for ok, word in (
                (self.fast, "speed"),
                (self.not_worse, "quality"),
                (self.beats_small, "small dense"),
            )
            if not ok
        ]


def targets(points: dict[str, list[Point]]) -> dict[str, list[Target]]:
    """Per dataset, every sparse setting on the frontier against the targets (datasets
    without a timed dense setting have none)."""
    out: dict[str, list[Target]] = {}
    for ds, dataset_points in points.items():
        dense = next((p for p in dataset_points if p.setting.method == "dense"), None)
        small = next((p for p in dataset_points if p.setting.method == EQUAL_TIME), None)
        if dense is None or dense.fid.mean is None:
            continue
        needed = SPEEDUP_TARGET.get(dense.setting.records[0].get("pipeline"), 1.5)
        out[ds] = [
            Target(
                point=p,
                needed=needed,
                dense=dense.fid,
                p_worse=welch_p_above(p.fid, dense.fid),
                small=small.fid if small else None,
                p_small=welch_p(p.fid, small.fid) if small else None,
            )
            for p in dataset_points
            if p.setting.sparsity > 0 and p.fid.mean is not None
        ]
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
