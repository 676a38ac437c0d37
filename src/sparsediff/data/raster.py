"""Rasterise sketches (anti-aliased uint8 arrays) and write SVGs.

Convention: **white strokes (255) on a black background (0)**, like MNIST; use the same
``rasterize`` settings for real and generated sets when computing FID. The sketch's
bounding box is fitted into the canvas (aspect ratio kept, centred, ``padding`` fraction
of the canvas on each side); y grows downwards, as in QuickDraw/KanjiVG coordinates.
PNG grids: stack :func:`rasterize` outputs to ``(N, 1, H, W)`` uint8 and write them with
:func:`sparsediff.imaging.save_image_grid` (``fill=128``: mid-grey gaps keep black cells visible).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sparsediff.data.sketch_ops import Sketch
from sparsediff.io import write_text


def _finite_strokes(strokes: Sequence[np.ndarray]) -> Sketch:
    # Generated sketches may contain NaN/inf; drop those points rather than fail.
    out = []
    for s in strokes:
        a = np.asarray(s, dtype=np.float64).reshape(-1, 2)
        a = a[np.isfinite(a).all(axis=1)]
        if len(a):
            out.append(a)
    return out


def fit_to_canvas(strokes: Sequence[np.ndarray], size: float, padding: float = 0.1) -> Sketch:
    """Map strokes into ``[0, size]^2`` canvas coordinates, bounding box centred, aspect kept.

    Non-finite points are dropped; a degenerate sketch (one point) lands in the centre.
    """
    strokes = _finite_strokes(strokes)
    if not strokes:
        return []
    pts = np.concatenate(strokes, axis=0)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = float((hi - lo).max())
    scale = size * (1.0 - 2.0 * padding) / extent if extent > 0 else 1.0
    centre = (lo + hi) / 2.0
    return [(s - centre) * scale + size / 2.0 for s in strokes]


def rasterize(
    strokes: Sequence[np.ndarray],
    size: int = 64,
    line_width: float = 2.0,
    padding: float = 0.1,
    supersample: int = 4,
) -> np.ndarray:
    """Render a sketch as an anti-aliased ``uint8`` ``(size, size)`` image, white on black.

    Drawn with round joints/caps on a ``supersample``-times larger canvas, then box-filtered
    down. ``line_width`` is in output pixels. Deterministic.
    """
    big = size * supersample
    width = max(1, int(round(line_width * supersample)))
    radius = width / 2.0
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for s in fit_to_canvas(strokes, big, padding):
        # PIL puts integer coordinates at pixel centres; ours put them at pixel corners.
        xy = [(float(x) - 0.5, float(y) - 0.5) for x, y in s]
        if len(xy) > 1:
            draw.line(xy, fill=255, width=width, joint="curve")
        for x, y in (xy[0], xy[-1]):  # round caps; also draws single-point strokes as dots
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def strokes_to_svg(
    strokes: Sequence[np.ndarray],
    size: int = 256,
    stroke_width: float = 2.0,
    padding: float = 0.1,
    color: str = "black",
    background: str | None = "white",
) -> str:
    """SVG document of the sketch (one ``<polyline>`` per stroke; dots for 1-point strokes).

    Fitted like :func:`rasterize`; SVGs are for viewing, so the default is black on white.
    """
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
        f'viewBox="0 0 {size} {size}">'
    ]
    if background is not None:
        parts.append(f'<rect width="100%" height="100%" fill="{background}"/>')
    style = (
        f'fill="none" stroke="{color}" stroke-width="{stroke_width:g}" '
        'stroke-linecap="round" stroke-linejoin="round"'
    )
    for s in fit_to_canvas(strokes, size, padding):
        if len(s) == 1:
            x, y = s[0]
            parts.append(
                f'<circle cx="{x:.2f}" cy="{y:.2f}" r="{stroke_width / 2:g}" fill="{color}"/>'
            )
        else:
            pts = " ".join(f"{x:.2f},{y:.2f}" for x, y in s)
            parts.append(f'<polyline points="{pts}" {style}/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def save_svg(strokes: Sequence[np.ndarray], path: str | Path, **kwargs: object) -> Path:
    """Atomically write :func:`strokes_to_svg` output (``kwargs`` forwarded); returns ``path``."""
    return write_text(path, strokes_to_svg(strokes, **kwargs))  # type: ignore[arg-type]
