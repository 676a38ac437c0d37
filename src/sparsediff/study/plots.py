"""The study report's figures: FID vs sparsity, FID vs training FLOPs, sample grids side by side.

Drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot, no global backend state).
The ``plot_*`` functions and ``compose_samples`` return the PNG's path, the ``*_figure`` functions
the Figure; each returns None when there is nothing to draw. FID axes start at 0 (or a given noise
floor) and their titles state the sample counts and seeds.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from sparsediff.io import atomic_write
from sparsediff.study.frontier import Point, setting_name
from sparsediff.study.stats import (
    Setting,
    baselines,
    pct,
    row_label,
    row_order,
    sample_sizes,
    split_dense,
)


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # Agg canvas, no global backend state

    return Figure(figsize=(width, height), layout="constrained")


def _finish_fid_axes(
    fig: Any, ax: Any, xlabel: str, title: str, floor: float, lines: dict[str, float] | None
) -> Any:
    styles = itertools.cycle((":", "--", "-.", (0, (1, 3))))
    for (label, y), style in zip((lines or {}).items(), styles):
        ax.axhline(y, color="dimgray", lw=1, ls=style, label=f"{label} ({y:.1f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # from the floor, not zoomed in: an autoscaled axis makes a 2% spread fill the panel
    top = ax.dataLim.y1  # the highest mean + std drawn
    if floor < top:
        ax.set_ylim(floor, top + 0.05 * (top - floor))
    return fig


def _fid_title(settings: list[Setting], title: str) -> str:
    return f"{title}\n{sample_sizes(settings).describe()}"


def _save(fig: Any, path: Path, dpi: int = 120) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))


def fid_vs_sparsity_figure(
    settings: list[Setting], title: str, floor: float = 0.0, lines: dict[str, float] | None = None
) -> Any:
    """FID against sparsity, a line per (method, p) with std error bars, dense as a band.

    The y axis starts at ``floor`` (0 by default), so the noise floors and baselines given as
    ``lines`` (label -> FID, drawn dashed) stay in view. None when there is nothing to draw.
    """
    dense, sparse = split_dense(settings)
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    if dense is not None and (d := dense.metric("fid")).mean is not None:
        ax.axhline(d.mean, color="black", lw=1, label=f"Dense ({d.format()})")
        if d.std is not None:
            ax.axhspan(d.mean - d.std, d.mean + d.std, color="gray", alpha=0.25)
    plotted = False
    for row in sorted({s.row for s in sparse}, key=row_order):
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
    return _finish_fid_axes(fig, ax, "sparsity (%)", _fid_title(settings, title), floor, lines)


def fid_vs_flops_figure(
    settings: list[Setting], title: str, floor: float = 0.0, lines: dict[str, float] | None = None
) -> Any:
    """FID against training FLOPs relative to dense (dense at 1); y from ``floor``, with
    ``lines`` as in :func:`fid_vs_sparsity_figure`."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    xs_all = []
    drawn = [s for s in settings if s.method == "dense" or s.sparsity > 0]  # baselines: lines
    for row in sorted({s.row for s in drawn}, key=row_order):
        pts = []
        for s in drawn:
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
    xlabel = "training FLOPs (× dense)"
    return _finish_fid_axes(fig, ax, xlabel, _fid_title(settings, title), floor, lines)


def plot_fid_vs_sparsity(
    settings: list[Setting],
    path: Path,
    title: str,
    floor: float = 0.0,
    lines: dict[str, float] | None = None,
) -> Path | None:
    """Write :func:`fid_vs_sparsity_figure` as a PNG."""
    fig = fid_vs_sparsity_figure(settings, title, floor, lines)
    return None if fig is None else _save(fig, path)


def plot_fid_vs_flops(
    settings: list[Setting],
    path: Path,
    title: str,
    floor: float = 0.0,
    lines: dict[str, float] | None = None,
) -> Path | None:
    """Write :func:`fid_vs_flops_figure` as a PNG."""
    fig = fid_vs_flops_figure(settings, title, floor, lines)
    return None if fig is None else _save(fig, path)


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


def _panel(ax: Any, img: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if img is not None:
        ax.imshow(img)
    else:
        ax.text(0.5, 0.5, "missing", ha="center", va="center", transform=ax.transAxes)


def compose_samples(
    settings: list[Setting], study_dir: Path, path: Path, title: str
) -> Path | None:
    """Sample grids side by side: Dense and the baselines (e.g. a small dense model) on top, then
    a row per (method, p) and a column per sparsity; a setting that was not run is left blank.
    With a single sparsity every setting stands in one row, dense first."""
    dense, sparse = split_dense(settings)
    columns = sorted({s.sparsity for s in sparse})
    rows = sorted({s.row for s in sparse}, key=row_order)
    at = {(s.row, s.sparsity): s for s in sparse}
    top = ([dense] if dense is not None else []) + baselines(settings)
    if len(columns) <= 1:  # one row, dense first
        line = top + [at[(row, c)] for row in rows for c in columns]
        layout, ylabels = [[(s, s.label) for s in line]], [""]
    else:
        layout = [[(s, row_label(*s.row)) for s in top]] if top else []
        layout += [
            [(at.get((row, c)), f"S = {pct(c)}" if i == 0 else "") for c in columns]
            for i, row in enumerate(rows)
        ]
        ylabels = [""] * bool(top) + [row_label(*row) for row in rows]
    images = {
        id(s): _load_image(s.sample_record().get("samples_grid"), study_dir)
        for line in layout
        for s, _ in line
        if s is not None
    }
    if all(img is None for img in images.values()):
        return None
    ncols = max(len(line) for line in layout)
    fig = _figure(max(2.2 * ncols, 4.0), 2.4 * len(layout) + 0.5)
    axes = fig.subplots(len(layout), ncols, squeeze=False)
    for i, line in enumerate(layout):
        labelled = False
        for j, ax in enumerate(axes[i]):
            setting, label = line[j] if j < len(line) else (None, "")
            if setting is None:
                ax.set_axis_off()  # not part of the grid
                continue
            _panel(ax, images[id(setting)])
            ax.set_title(label, fontsize=9)
            if ylabels[i] and not labelled:
                ax.set_ylabel(ylabels[i], fontsize=9)
                labelled = True
    fig.suptitle(f"{title}: samples with fixed seeds (seed-0 runs)", fontsize=10)
    return _save(fig, path, dpi=110)


def plot_frontier(points: list[Point], path: Path, dataset: str) -> Path | None:
    """FID (mean ± std over seeds) against sampling time per sample, a point per setting."""
    drawn = [p for p in points if p.fid.mean is not None and p.seconds.mean is not None]
    if not drawn:
        return None
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    for p in drawn:
        ax.errorbar(
            p.seconds.mean * 1e3,
            p.fid.mean,
            yerr=p.fid.std or 0,
            xerr=(p.seconds.std or 0) * 1e3,
            fmt="o",
            capsize=3,
        )
        ax.annotate(
            setting_name(p.setting),
            (p.seconds.mean * 1e3, p.fid.mean),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    what = "denoiser-only FID (vs reconstructions)" if drawn[0].denoiser_only else "FID"
    ax.set_xlabel("sampling time per sample, deployed (ms, 1 thread)")
    ax.set_ylabel(f"{what} ↓")
    ax.set_title(f"{dataset}: quality against sampling time (lower left is better)")
    ax.grid(alpha=0.3)
    return _save(fig, path)
