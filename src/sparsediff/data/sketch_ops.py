"""Geometry and representations of pen sketches (ChiroDiff-style preprocessing).

Internal type: a *sketch* is a list of strokes, each an ``(n, 2)`` float array of (x, y)
points in drawing order (y grows downwards, as in screen/SVG coordinates).

Sequence representations, both ``(L, 3)`` float32:

* ``"velocity"``: rows (dx, dy, pen); the first row is the first point itself (offset from
  the origin), so positions are ``cumsum`` of the first two columns.
* ``"absolute"``: rows (x, y, pen).

``pen`` is 1 on the last point of each stroke and 0 elsewhere (stroke-3 convention).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Sketch = list[np.ndarray]

REPRESENTATIONS = ("velocity", "absolute")
DEFAULT_PEN_THRESHOLD = 0.8
# Arc-length resampling step for unit-extent sketches: typical KanjiVG kanji get ~50-200 points.
DEFAULT_STEP = 0.05
DEFAULT_MAX_LEN = 300


def check_representation(representation: str) -> str:
    """Return ``representation`` if it is a known sequence representation, else raise."""
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    return representation


def validate_sketch(strokes: object) -> str | None:
    """Return ``None`` if ``strokes`` is a well-formed sketch, else a short reason string.

    Well formed: a non-empty sequence of finite ``(n, 2)`` arrays with ``n >= 1``.
    """
    if not isinstance(strokes, (list, tuple)) or len(strokes) == 0:
        return "empty"
    for s in strokes:
        try:
            a = np.asarray(s, dtype=np.float64)
        except (TypeError, ValueError):
            return "bad_shape"
        if a.ndim != 2 or a.shape[1] != 2:
            return "bad_shape"
        if a.shape[0] < 1:
            return "empty_stroke"
        if not np.isfinite(a).all():
            return "nonfinite"
    return None


def _as_points(stroke: object) -> np.ndarray:
    return np.asarray(stroke, dtype=np.float64).reshape(-1, 2)


def bounding_box(strokes: Sequence[np.ndarray]) -> tuple[float, float, float, float]:
    """Return ``(xmin, ymin, xmax, ymax)`` over all points of a non-empty sketch."""
    pts = np.concatenate([_as_points(s) for s in strokes], axis=0)
    (xmin, ymin), (xmax, ymax) = pts.min(axis=0), pts.max(axis=0)
    return float(xmin), float(ymin), float(xmax), float(ymax)


def normalize_strokes(strokes: Sequence[np.ndarray], extent: float = 1.0) -> Sketch:
    """Centre the bounding box on the origin and scale so its larger side equals ``extent``.

    Aspect ratio is kept. A degenerate sketch (all points equal) is only centred.
    """
    xmin, ymin, xmax, ymax = bounding_box(strokes)
    centre = np.array([(xmin + xmax) / 2.0, (ymin + ymax) / 2.0])
    size = max(xmax - xmin, ymax - ymin)
    scale = extent / size if size > 0 else 1.0
    return [(_as_points(s) - centre) * scale for s in strokes]


def resample_stroke(points: np.ndarray, step: float) -> np.ndarray:
    """Resample a polyline at (approximately) fixed arc-length ``step``, keeping both ends.

    The stroke of length ``L`` is cut into ``max(1, round(L / step))`` equal pieces, so the
    points are exactly evenly spaced and the end points are preserved (a line of length 1
    with step 0.1 gives 11 points). Strokes shorter than a step keep just their two end
    points; a stroke with no extent collapses to a single point.
    """
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    pts = _as_points(points)
    seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    # Zero-length segments would make the arc-length parameter non-increasing for interp.
    keep = np.concatenate([[True], seg > 0])
    pts, seg = pts[keep], seg[seg > 0]
    if len(pts) == 1:
        return pts.copy()
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(1, int(round(cum[-1] / step)))
    targets = np.linspace(0.0, cum[-1], n + 1)
    out = np.stack([np.interp(targets, cum, pts[:, 0]), np.interp(targets, cum, pts[:, 1])], 1)
    out[0], out[-1] = pts[0], pts[-1]
    return out


def rdp(points: np.ndarray, epsilon: float) -> np.ndarray:
    """Ramer-Douglas-Peucker simplification of a polyline (distance to the chord segment).

    Points within ``epsilon`` of the simplified polyline are removed; end points are kept.
    Uses :func:`skimage.measure.approximate_polygon`; returns a new ``(M, 2)`` float64 array.
    """
    pts = _as_points(points)
    if epsilon <= 0 or len(pts) <= 2:
        return pts.copy()
    # Imported here: skimage.measure pulls in scipy (~0.6 s), needed only when RDP is on.
    from skimage.measure import approximate_polygon

    return approximate_polygon(pts, tolerance=epsilon)


def preprocess_strokes(
    strokes: Sequence[np.ndarray],
    step: float | None = DEFAULT_STEP,
    rdp_epsilon: float | None = None,
    extent: float = 1.0,
) -> Sketch:
    """ChiroDiff preprocessing: normalise, resample at arc-length ``step``, then optional RDP.

    ``step=None`` skips resampling; ``rdp_epsilon`` is in normalised units (after scaling).
    """
    out = normalize_strokes(strokes, extent)
    if step is not None:
        out = [resample_stroke(s, step) for s in out]
    if rdp_epsilon:
        out = [rdp(s, rdp_epsilon) for s in out]
    return out


def strokes_to_sequence(
    strokes: Sequence[np.ndarray], representation: str = "velocity"
) -> np.ndarray:
    """Convert a sketch into an ``(L, 3)`` float32 sequence in the given representation."""
    check_representation(representation)
    parts = [_as_points(s) for s in strokes]
    if not parts or any(len(p) == 0 for p in parts):
        raise ValueError("cannot convert an empty sketch or a stroke with no points")
    pts = np.concatenate(parts, axis=0)
    pen = np.zeros(len(pts))
    pen[np.cumsum([len(p) for p in parts]) - 1] = 1.0
    xy = np.diff(pts, axis=0, prepend=np.zeros((1, 2))) if representation == "velocity" else pts
    return np.concatenate([xy, pen[:, None]], axis=1).astype(np.float32)


def sequence_to_strokes(
    seq: object,
    representation: str = "velocity",
    pen_threshold: float = DEFAULT_PEN_THRESHOLD,
) -> Sketch:
    """Decode an ``(L, 3)`` sequence (numpy array or CPU tensor) into a sketch.

    A stroke ends after every point whose pen value is ``> pen_threshold``; points after
    the last pen-up form a final stroke. Returns ``[]`` for an empty sequence.
    """
    check_representation(representation)
    if hasattr(seq, "detach"):
        seq = seq.detach().cpu().numpy()  # type: ignore[union-attr]
    a = np.asarray(seq, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"expected an (L, 3) sequence, got shape {a.shape}")
    if len(a) == 0:
        return []
    pts = np.cumsum(a[:, :2], axis=0) if representation == "velocity" else a[:, :2]
    ends = np.flatnonzero(a[:, 2] > pen_threshold) + 1
    return [p for p in np.split(pts, ends) if len(p) > 0]


def sequences_to_sketches(
    x: object,
    lengths: object,
    representation: str = "velocity",
    pen_threshold: float = DEFAULT_PEN_THRESHOLD,
) -> list[Sketch]:
    """Decode a padded batch ``(B, L, 3)`` with valid ``lengths`` ``(B,)`` into sketches."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    if hasattr(lengths, "detach"):
        lengths = lengths.detach().cpu().numpy()  # type: ignore[union-attr]
    xs, ls = np.asarray(x), np.asarray(lengths).astype(int)
    return [
        sequence_to_strokes(xs[i, : ls[i]], representation, pen_threshold) for i in range(len(xs))
    ]


def stroke3_to_strokes(stroke3: np.ndarray) -> Sketch:
    """Convert a stroke-3 array (dx, dy, pen-lifted) into a sketch (cumulative positions)."""
    return sequence_to_strokes(stroke3, "velocity", pen_threshold=0.5)


def strokes_to_stroke3(strokes: Sequence[np.ndarray]) -> np.ndarray:
    """Convert a sketch into a float32 stroke-3 array (identical to the velocity sequence)."""
    return strokes_to_sequence(strokes, "velocity")
