"""The study report: FID tables, cost, plots, side-by-side samples and "safe values".

``write_report(study_dir)`` reads ``results.jsonl`` (and ``study.json`` for the command and the
dataset order) and writes ``report/report.md`` with its PNGs next to it in ``report/``.

Conventions: a *setting* is (dataset, method, p, sparsity), aggregated over seeds as mean and
sample standard deviation (shown only with >= 2 seeds). In the FID table the Dense row repeats
the dense reference in every column, and bold marks the lowest mean FID among the sparse settings
of each column. A sparse setting is *safe* when its mean FID <= dense mean + tolerance, where the
tolerance is the larger of the known standard deviations of dense and the setting (known = >= 2
seeds); with neither known it is ``rel_tol`` (5%) of the dense mean, and the verdict is weak.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsediff.study.grid import flatten
from sparsediff.study.sweep import RESULTS_FILE, STUDY_FILE, read_results

METHOD_NAMES = {"dense": "Dense", "static": "Static", "rigl": "RigL", "magran": "MagRan"}
REL_TOL = 0.05
MISSING = "–"
# cost ratios shown against dense: (label, key, dense key)
COST_RATIOS = (
    ("Params (×dense)", "params_nonzero", "params_dense_total"),
    ("Train FLOPs (×dense)", "train_flops", "train_flops_dense"),
    ("Inference FLOPs (×dense)", "inference_flops", "inference_flops_dense"),
    ("Sample FLOPs (×dense)", "sample_flops", "sample_flops_dense"),
)


@dataclass(frozen=True)
class Stat:
    """Mean and sample std over seeds; std is None below two values."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[Any]) -> Stat:
        """Summarize the numeric, finite values (others are ignored)."""
        xs = [float(v) for v in values if _number(v)]
        if not xs:
            return cls(None, None, 0)
        mean = sum(xs) / len(xs)
        if len(xs) < 2:
            return cls(mean, None, 1)
        var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
        return cls(mean, math.sqrt(var), len(xs))

    def format(self, digits: int = 2, scale: float = 1.0, n_full: int = 0) -> str:
        """``12.34 ± 0.56``; ``12.34`` with one seed; ``(n=k)`` when fewer seeds than others."""
        if self.mean is None:
            return MISSING
        text = f"{self.mean * scale:.{digits}f}"
        if self.std is not None:
            text += f" ± {self.std * scale:.{digits}f}"
        if self.n < n_full:
            text += f" (n={self.n})"
        return text


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Setting:
    """One (dataset, method, p, sparsity) and its records, one per seed."""

    dataset: str
    method: str
    prune_ratio: float | None
    sparsity: float
    records: list[dict] = field(default_factory=list)

    @property
    def row(self) -> tuple[str, float | None]:
        """The table row this setting belongs to."""
        return (self.method, self.prune_ratio)

    @property
    def label(self) -> str:
        """``RigL (p=0.05) at 50%``."""
        base = row_label(*self.row)
        return base if self.method == "dense" else f"{base} at {pct(self.sparsity)}"

    def metric(self, name: str) -> Stat:
        """A metric over seeds."""
        return Stat.of((r.get("metrics") or {}).get(name) for r in self.records)

    def cost_ratio(self, key: str, dense_key: str) -> Stat:
        """cost[key] / cost[dense_key] over seeds."""
        values = []
        for r in self.records:
            cost = r.get("cost") or {}
            if _number(cost.get(key)) and _number(cost.get(dense_key)) and cost[dense_key]:
                values.append(cost[key] / cost[dense_key])
        return Stat.of(values)

    def sample_record(self) -> dict:
        """The record of the lowest seed (seed 0 normally), whose sample grid is shown."""
        return min(self.records, key=lambda r: r.get("seed", 0))


def pct(sparsity: float) -> str:
    """0.25 -> ``25%``."""
    return f"{sparsity * 100:g}%"


def row_label(method: str, prune_ratio: float | None) -> str:
    """``Dense``, ``Static``, ``RigL (p=0.05)``."""
    name = METHOD_NAMES.get(method, method)
    return name if prune_ratio is None else f"{name} (p={prune_ratio:g})"


def _row_order(row: tuple[str, float | None]) -> tuple:
    method, p = row
    rank = list(METHOD_NAMES).index(method) if method in METHOD_NAMES else len(METHOD_NAMES)
    return (rank, method, p if p is not None else -1.0)


def group_settings(records: list[dict]) -> dict[str, list[Setting]]:
    """Records -> settings per dataset, in table order (row, then sparsity)."""
    groups: dict[str, dict[tuple, Setting]] = {}
    for r in records:
        p = r.get("prune_ratio")
        key = (r["method"], p, float(r.get("sparsity") or 0.0))
        by_key = groups.setdefault(r["dataset"], {})
        by_key.setdefault(key, Setting(r["dataset"], key[0], p, key[2])).records.append(r)
    return {
        ds: sorted(by_key.values(), key=lambda s: (_row_order(s.row), s.sparsity))
        for ds, by_key in groups.items()
    }


def _split(settings: list[Setting]) -> tuple[Setting | None, list[Setting]]:
    dense = [s for s in settings if s.method == "dense"]
    return (dense[0] if dense else None), [s for s in settings if s.method != "dense"]


def _markdown(header: list[str], rows: list[list[str]], align: str = "r") -> str:
    lines = ["| " + " | ".join(header) + " |"]
    sep = "---:" if align == "r" else "---"
    lines.append("| " + " | ".join(["---"] + [sep] * (len(header) - 1)) + " |")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _columns(sparse: list[Setting]) -> list[float]:
    return sorted({s.sparsity for s in sparse}) or [0.0]


def metric_table(
    settings: list[Setting],
    metric: str = "fid",
    title: str = "FID ↓",
    digits: int = 2,
    scale: float = 1.0,
    higher_better: bool = False,
) -> str:
    """Markdown table of one dataset: rows (method, p), columns sparsity levels.

    The Dense row repeats the dense value in every column; bold marks the best mean among the
    sparse settings of each column.
    """
    dense, sparse = _split(settings)
    columns = _columns(sparse)
    n_full = max((s.metric(metric).n for s in settings), default=0)
    cells: dict[tuple, dict[float, Stat]] = {}
    for s in sparse:
        cells.setdefault(s.row, {})[s.sparsity] = s.metric(metric)
    pick = max if higher_better else min
    best = {}
    for col in columns:
        means = [c[col].mean for c in cells.values() if col in c and c[col].mean is not None]
        best[col] = pick(means) if means else None
    rows = []
    if dense is not None:
        text = dense.metric(metric).format(digits, scale, n_full)
        rows.append(["Dense"] + [text] * len(columns))
    for row in sorted(cells, key=_row_order):
        line = [row_label(*row)]
        for col in columns:
            stat = cells[row].get(col, Stat(None, None, 0))
            text = stat.format(digits, scale, n_full)
            line.append(f"**{text}**" if stat.mean is not None and stat.mean == best[col] else text)
        rows.append(line)
    return _markdown([f"{title} / sparsity"] + [pct(c) for c in columns], rows)


def fid_table(settings: list[Setting]) -> str:
    """The table the study is about: FID per (method, p) and sparsity."""
    return metric_table(settings, "fid", "FID ↓")


def cost_table(settings: list[Setting]) -> str:
    """Params / train / inference / sample FLOPs relative to dense, per (method, p) and sparsity."""
    _, sparse = _split(settings)
    columns = _columns(sparse)
    cells: dict[tuple, dict[float, str]] = {}
    for s in sparse:
        parts = [_ratio(s.cost_ratio(key, dense_key).mean) for _, key, dense_key in COST_RATIOS]
        cells.setdefault(s.row, {})[s.sparsity] = " / ".join(parts)
    rows = [
        [row_label(*row)] + [cells[row].get(col, MISSING) for col in columns]
        for row in sorted(cells, key=_row_order)
    ]
    title = "×dense: params / train / inference / sample FLOPs"
    return _markdown([title] + [pct(c) for c in columns], rows)


def dense_cost(settings: list[Setting]) -> str | None:
    """One line of the dense model's absolute costs (the reference of the ratios)."""
    dense, _ = _split(settings)
    if dense is None:
        return None
    parts = []
    for key, unit, what in (
        ("params_nonzero", "", "non-zero parameters"),
        ("train_flops", "FLOP", "to train"),
        ("inference_flops", "FLOP", "per network evaluation"),
        ("sample_flops", "FLOP", "per sample"),
    ):
        value = Stat.of((r.get("cost") or {}).get(key) for r in dense.records).mean
        if value is not None:
            parts.append(f"{_count(value, unit)} {what}")
    seconds = Stat.of((r.get("cost") or {}).get("sampling_seconds") for r in dense.records).mean
    if seconds is not None:
        parts.append(f"{seconds:.1f} s of sampling")
    return "Dense: " + ", ".join(parts) + "." if parts else None


def _count(x: float, unit: str = "") -> str:
    """1.5e9 -> ``1.50 GFLOP`` (unit FLOP) or ``1.50 G``."""
    for prefix, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}".rstrip()


def _ratio(x: float | None) -> str:
    return MISSING if x is None else f"{x:.3f}"


OTHER_METRICS = (  # (metric, title, digits, scale, higher is better)
    ("kid_mean", "KID ×10³ ↓", 2, 1e3, False),
    ("precision", "Precision ↑", 3, 1.0, True),
    ("recall", "Recall ↑", 3, 1.0, True),
)


def other_tables(settings: list[Setting]) -> list[str]:
    """KID / precision / recall tables, for those metrics some record has."""
    return [
        metric_table(settings, metric, title, digits, scale, higher)
        for metric, title, digits, scale, higher in OTHER_METRICS
        if any(s.metric(metric).n for s in settings)
    ]


@dataclass(frozen=True)
class Verdict:
    """Whether a sparse setting matches or beats dense within the seed spread."""

    setting: Setting
    fid: Stat
    dense: Stat
    tolerance: float
    rule: str
    safe: bool
    beats: bool
    weak: bool

    def describe(self) -> str:
        """``RigL (p=0.05) at 50%: FID 1.00 ± 0.10 vs dense 1.20 ± 0.10, beats dense``."""
        how = "beats dense" if self.beats else "matches dense" if self.safe else "worse than dense"
        weak = "; weak: single seed" if self.weak else ""
        return (
            f"{self.setting.label}: FID {self.fid.format()} vs dense {self.dense.format()}, "
            f"{how} (tolerance {self.tolerance:.2f}, {self.rule}{weak})"
        )


def judge(setting: Setting, dense: Stat, rel_tol: float = REL_TOL) -> Verdict | None:
    """The safe-value verdict of one sparse setting against dense; None without both FIDs."""
    fid = setting.metric("fid")
    if fid.mean is None or dense.mean is None:
        return None
    known = [s for s in (dense.std, fid.std) if s is not None]
    if known:
        tolerance, rule = max(known), "seed spread"
    else:
        tolerance, rule = rel_tol * abs(dense.mean), f"{rel_tol:.0%} of dense, no spread known"
    return Verdict(
        setting=setting,
        fid=fid,
        dense=dense,
        tolerance=tolerance,
        rule=rule,
        safe=fid.mean <= dense.mean + tolerance,
        beats=fid.mean < dense.mean,
        weak=min(fid.n, dense.n) < 2,
    )


def safe_values(records: list[dict], rel_tol: float = REL_TOL) -> dict[str, list[Verdict]]:
    """Verdicts for every sparse setting, per dataset (``[v for v in ... if v.safe]`` = safe)."""
    out = {}
    for ds, settings in group_settings(records).items():
        dense, sparse = _split(settings)
        if dense is None:
            continue
        verdicts = [judge(s, dense.metric("fid"), rel_tol) for s in sparse]
        out[ds] = [v for v in verdicts if v is not None]
    return out


@dataclass(frozen=True)
class PComparison:
    """Smallest vs largest p of one dynamic method at the highest sparsity having both."""

    dataset: str
    method: str
    sparsity: float
    p_low: float
    p_high: float
    low: Stat
    high: Stat

    @property
    def low_better(self) -> bool:
        """The smaller p has the lower mean FID."""
        return self.low.mean < self.high.mean

    @property
    def conclusive(self) -> bool:
        """The gap exceeds the known seed spread (never with single seeds)."""
        known = [s for s in (self.low.std, self.high.std) if s is not None]
        return bool(known) and abs(self.low.mean - self.high.mean) > max(known)

    def describe(self) -> str:
        """A sentence stating which p is better, and how firmly."""
        head = (
            f"{METHOD_NAMES.get(self.method, self.method)} at {pct(self.sparsity)}: "
            f"p = {self.p_low:g} gives FID {self.low.format()}, p = {self.p_high:g} gives "
            f"{self.high.format()}; "
        )
        if self.low.mean == self.high.mean:
            return head + "a tie."
        win, lose = (self.p_low, self.p_high) if self.low_better else (self.p_high, self.p_low)
        firm = (
            "beyond the seed spread"
            if self.conclusive
            else "not conclusive: "
            + ("within the seed spread" if self.low.n > 1 or self.high.n > 1 else "single seed")
        )
        return head + f"p = {win:g} is better than p = {lose:g} ({firm})."


def compare_prune_ratios(records: list[dict]) -> list[PComparison]:
    """For each dataset and dynamic method, compare p values at the highest shared sparsity."""
    out = []
    for ds, settings in group_settings(records).items():
        by_method: dict[str, dict[float, dict[float, Stat]]] = {}
        for s in settings:
            fid = s.metric("fid")
            if s.prune_ratio is not None and fid.mean is not None:
                by_method.setdefault(s.method, {}).setdefault(s.sparsity, {})[s.prune_ratio] = fid
        for method, by_sparsity in by_method.items():
            shared = [sp for sp, by_p in by_sparsity.items() if len(by_p) >= 2]
            if not shared:
                continue
            sparsity = max(shared)
            by_p = by_sparsity[sparsity]
            lo, hi = min(by_p), max(by_p)
            out.append(PComparison(ds, method, sparsity, lo, hi, by_p[lo], by_p[hi]))
    return out


# ---------------------------------------------------------------- plots (matplotlib, no pyplot)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # Agg canvas, no global backend state

    return Figure(figsize=(width, height), layout="constrained")


def plot_fid_vs_sparsity(settings: list[Setting], path: Path, title: str) -> Path | None:
    """FID against sparsity, a line per (method, p) with std error bars, dense as a band."""
    dense, sparse = _split(settings)
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    if dense is not None and (d := dense.metric("fid")).mean is not None:
        ax.axhline(d.mean, color="black", lw=1, label=f"Dense ({d.format()})")
        if d.std is not None:
            ax.axhspan(d.mean - d.std, d.mean + d.std, color="gray", alpha=0.25)
    plotted = False
    for row in sorted({s.row for s in sparse}, key=_row_order):
        pts = [(s.sparsity * 100, s.metric("fid")) for s in sparse if s.row == row]
        pts = [(x, st) for x, st in pts if st.mean is not None]
        if pts:
            xs, ys = [x for x, _ in pts], [st.mean for _, st in pts]
            err = [st.std or 0.0 for _, st in pts]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=row_label(*row))
            plotted = True
    if not plotted and dense is None:
        return None
    ax.set_xticks(sorted({s.sparsity * 100 for s in sparse}))
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def plot_fid_vs_flops(settings: list[Setting], path: Path, title: str) -> Path | None:
    """FID against training FLOPs relative to dense (dense at 1)."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    xs_all = []
    for row in sorted({s.row for s in settings}, key=_row_order):
        pts = []
        for s in settings:
            flops, fid = s.cost_ratio("train_flops", "train_flops_dense"), s.metric("fid")
            if s.row == row and flops.mean is not None and fid.mean is not None:
                pts.append((flops.mean, fid))
        if pts:
            pts.sort(key=lambda t: t[0])
            xs = [x for x, _ in pts]
            err = [st.std or 0.0 for _, st in pts]
            style = {"color": "black", "marker": "s"} if row[0] == "dense" else {"marker": "o"}
            ys = [st.mean for _, st in pts]
            ax.errorbar(xs, ys, yerr=err, capsize=3, label=row_label(*row), **style)
            xs_all += xs
    if not xs_all:
        return None
    if max(xs_all) / max(min(xs_all), 1e-12) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (× dense)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


def _load_image(path: str | None, study_dir: Path) -> Any:
    if not path:
        return None
    p = Path(path)
    p = p if p.is_absolute() else study_dir / p
    try:
        from PIL import Image

        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((512, 512))  # keep the composed figure small
            return im
    except OSError:
        return None


def compose_samples(
    settings: list[Setting], study_dir: Path, path: Path, title: str
) -> Path | None:
    """Sample grids side by side: a row per (method, p), Dense first, then each sparsity."""
    dense, sparse = _split(settings)
    columns = sorted({s.sparsity for s in sparse})
    rows = sorted({s.row for s in sparse}, key=_row_order) or [("dense", None)]
    at = {(s.row, s.sparsity): s for s in sparse}
    dense_img = _load_image(dense.sample_record().get("samples_grid"), study_dir) if dense else None
    grid = [[dense_img] + [None] * len(columns) for _ in rows]
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            if (s := at.get((row, col))) is not None:
                grid[i][j + 1] = _load_image(s.sample_record().get("samples_grid"), study_dir)
    if all(img is None for line in grid for img in line):
        return None
    ncols = len(columns) + 1
    fig = _figure(2.2 * ncols, 2.4 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(ncols):
            ax, img = axes[i][j], grid[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if img is not None:
                ax.imshow(img)
            else:
                ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)
            if i == 0:
                ax.set_title("Dense" if j == 0 else f"S = {pct(columns[j - 1])}", fontsize=9)
            if j == 0 and row[0] != "dense":
                ax.set_ylabel(row_label(*row), fontsize=9)
    fig.suptitle(f"{title}: samples with fixed seeds (seed-0 runs)")
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------- the report


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _protocol_table(records: list[dict], datasets: list[str]) -> str:
    """Rows: protocol keys; columns: datasets; differing values are joined with ' / '."""
    values: dict[str, dict[str, list[str]]] = {}
    for r in records:
        for key, v in flatten(r.get("protocol") or {}).items():
            text = v if isinstance(v, str) else json.dumps(v)
            seen = values.setdefault(key, {}).setdefault(r["dataset"], [])
            if text not in seen:
                seen.append(text)
    if not values:
        return "_No protocol recorded by the evaluation._"
    rows = [
        [key] + [" / ".join(values[key].get(ds, [MISSING])) for ds in datasets] for key in values
    ]
    return _markdown(["Protocol"] + datasets, sorted(rows), align="l")


def _dataset_order(records: list[dict], study: dict) -> list[str]:
    listed = [d["name"] for d in study.get("study", {}).get("datasets", [])]
    seen = [r["dataset"] for r in records]
    return [d for d in listed if d in seen] + list(
        dict.fromkeys(d for d in seen if d not in listed)
    )


def _safe_section(records: list[dict], datasets: list[str], rel_tol: float) -> list[str]:
    verdicts = safe_values(records, rel_tol)
    lines = [
        "## Safe values",
        "",
        "A sparse setting is *safe* when its mean FID ≤ dense mean FID + tolerance. The tolerance "
        "is the larger of the seed standard deviations of dense and of the setting (a standard "
        f"deviation needs ≥ 2 seeds). When neither is known, the tolerance is {rel_tol:.0%} of the "
        "dense mean FID. A verdict resting on a single seed on either side is marked weak: its "
        "seed-to-seed spread is unknown.",
        "",
    ]
    safe_sets = []
    for ds in datasets:
        if ds not in verdicts:
            lines.append(f"- **{ds}**: no dense run, so no verdict.")
            continue
        safe = [v for v in verdicts[ds] if v.safe]
        safe_sets.append({v.setting.label for v in safe})
        lines.append(f"- **{ds}**: {len(safe)} of {len(verdicts[ds])} sparse settings are safe.")
        lines += [f"  - {v.describe()}" for v in safe]
        unsafe = [v.setting.label for v in verdicts[ds] if not v.safe]
        if unsafe:
            lines.append(f"  - Not safe: {', '.join(unsafe)}.")
    if len(safe_sets) > 1:
        common = sorted(set.intersection(*safe_sets))
        lines += ["", f"Safe on every dataset: {', '.join(common) if common else 'none'}."]
    comparisons = compare_prune_ratios(records)
    lines += ["", "### Prune/regrowth ratio at the highest sparsity", ""]
    if not comparisons:
        lines.append("No sparsity level has runs with two values of p.")
    for c in comparisons:
        lines.append(f"- **{c.dataset}**, {c.describe()}")
    if comparisons:
        wins = sum(c.low_better for c in comparisons)
        firm = sum(c.low_better and c.conclusive for c in comparisons)
        lines += [
            "",
            f"The smaller p was better in {wins} of {len(comparisons)} comparisons "
            f"({firm} beyond the seed spread).",
        ]
    return lines


def write_report(study_dir: Path, rel_tol: float = REL_TOL) -> Path:
    """Write ``study_dir/report/report.md`` and its PNGs; return the report's path."""
    study_dir = Path(study_dir)
    # the last line of a cell wins; lines without a cell's identity cannot be placed in a table
    by_id = {r["id"]: r for r in read_results(study_dir / RESULTS_FILE)}
    records = [r for r in by_id.values() if r.get("dataset") and r.get("method")]
    if not records:
        raise ValueError(f"no results in {study_dir / RESULTS_FILE}")
    study_path = study_dir / STUDY_FILE
    study = json.loads(study_path.read_text()) if study_path.exists() else {}
    out = study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    by_dataset = group_settings(records)
    datasets = _dataset_order(records, study)
    n_cells = len(study.get("cells", [])) or len(records)
    name = study.get("name", study_dir.name)
    lines = [
        f"# Study report: {name}",
        "",
        f"- Study: `{study.get('command', MISSING)}`",
        f"- Report: `{shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        f"- Finished cells: {len(records)} of {n_cells}; datasets: {', '.join(datasets)}.",
    ]
    if desc := study.get("study", {}).get("description"):
        lines += ["", desc]
    lines += ["", "## Protocol", "", _protocol_table(records, datasets), ""]
    lines += [
        "Values are mean ± sample std over seeds (± only with ≥ 2 seeds; `(n=k)` marks a setting "
        "with fewer seeds than the others). **Bold**: the best mean among the sparse settings at "
        "that sparsity (lowest FID/KID, highest precision/recall); the Dense row repeats the dense "
        "reference in every column. Costs are means over seeds, relative to the dense model as "
        "each run's evaluation counted it: non-zero parameters, inference FLOPs per network "
        "evaluation, sample FLOPs per generated sample (sampler steps and decoding included).",
        "",
    ]
    for ds in datasets:
        settings, slug = by_dataset[ds], _slug(ds)
        first = settings[0].records[0]
        lines += [f"## {ds}", "", f"Preset `{first.get('preset')}` ({first.get('pipeline')}).", ""]
        lines += [fid_table(settings), ""]
        if (line := dense_cost(settings)) is not None:
            lines += [line, ""]
        lines += [cost_table(settings), ""]
        for table in other_tables(settings):
            lines += [table, ""]
        figures = [
            (plot_fid_vs_sparsity, f"fid_vs_sparsity_{slug}.png", "FID vs sparsity"),
            (plot_fid_vs_flops, f"fid_vs_train_flops_{slug}.png", "FID vs training FLOPs"),
        ]
        for plot, filename, caption in figures:
            if plot(settings, out / filename, ds) is not None:
                lines += [f"![{caption}]({filename})", ""]
        samples = f"samples_{slug}.png"
        if compose_samples(settings, study_dir, out / samples, ds) is not None:
            lines += [f"![Samples]({samples})", ""]
    lines += _safe_section(records, datasets, rel_tol)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
