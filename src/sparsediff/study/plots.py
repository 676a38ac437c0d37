"""The study report's figures: FID vs sparsity, FID vs training FLOPs, sample grids side by side.

Drawn on matplotlib ``Figure`` objects with the Agg canvas (no pyplot, no global backend state).
Each function returns the PNG's path, or None when there is nothing to draw.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsediff.io import atomic_write
from sparsediff.study.stats import Setting, pct, row_label, row_order, split_dense


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # Agg canvas, no global backend state

    return Figure(figsize=(width, height), layout="constrained")


def _save_fid_axes(fig: Any, ax: Any, xlabel: str, title: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def plot_fid_vs_sparsity(settings: list[Setting], path: Path, title: str) -> Path | None:
    """FID against sparsity, a line per (method, p) with std error bars, dense as a band."""
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
    return _save_fid_axes(fig, ax, "sparsity (%)", title, path)


def plot_fid_vs_flops(settings: list[Setting], path: Path, title: str) -> Path | None:
    """FID against training FLOPs relative to dense (dense at 1)."""
    fig = _figure(6, 4)
    ax = fig.add_subplot()
    xs_all = []
    for row in sorted({s.row for s in settings}, key=row_order):
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
    return _save_fid_axes(fig, ax, "training FLOPs (× dense)", title, path)


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
    dense, sparse = split_dense(settings)
    columns = sorted({s.sparsity for s in sparse})
    rows = sorted({s.row for s in sparse}, key=row_order) or [("dense", None)]
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
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
