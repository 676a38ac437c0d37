"""VMNIST: vector MNIST made by skeletonising and tracing raster digits.

Pipeline per image: threshold -> ``skimage.morphology.skeletonize`` -> 8-connected pixel
graph (diagonal links dropped where an orthogonal path exists, so corners do not form
little triangles) -> polylines walked from end points, then junctions, then leftover
loops; at a junction the walk continues in the straightest direction if it turns by less
than 60 degrees, else the stroke ends there -> strokes in pixel coordinates
(x = column, y = row, y down).

Output layout (one file, sketch-rnn compatible)::

    <out>/vmnist.npz
        train, valid, test              object arrays of int16 (n, 3) stroke-3 sequences
        train_labels, valid_labels, test_labels   int64 digit labels (-1 when unknown)

``valid`` is a seeded random part of MNIST train; ``test`` is MNIST t10k. Load with
``load_stroke_dataset("vmnist", "<out>", split)``. CLI:
``python -m sparsediff.data.vmnist --mnist-dir DIR --out OUT``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from skimage.morphology import skeletonize

from sparsediff.data.idx import read_idx
from sparsediff.data.sketch_ops import Sketch, strokes_to_stroke3
from sparsediff.data.splits import seeded_split
from sparsediff.data.strokes import save_stroke3_npz

VMNIST_FILE = "vmnist.npz"
_ORTHO = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DIAG = ((-1, -1), (-1, 1), (1, -1), (1, 1))
_MIN_JUNCTION_COS = 0.5  # a walk crosses a junction only when turning by less than 60 degrees


def _pixel_graph(skel: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    on = {(int(r), int(c)) for r, c in zip(*np.nonzero(skel))}
    adj: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r, c in sorted(on):
        nbrs = [(r + dr, c + dc) for dr, dc in _ORTHO if (r + dr, c + dc) in on]
        for dr, dc in _DIAG:
            # A diagonal step is redundant when an orthogonal 2-step path exists.
            if (r + dr, c + dc) in on and (r + dr, c) not in on and (r, c + dc) not in on:
                nbrs.append((r + dr, c + dc))
        adj[(r, c)] = nbrs
    return adj


def trace_skeleton(skel: np.ndarray, min_points: int = 3) -> list[np.ndarray]:
    """Trace a binary skeleton into polylines of (x, y) pixel coordinates.

    Polylines with fewer than ``min_points`` pixels (specks, tiny spurs) are dropped
    unless nothing else is left.
    """
    adj = _pixel_graph(skel)
    used: set[frozenset[tuple[int, int]]] = set()

    def free(p: tuple[int, int]) -> list[tuple[int, int]]:
        return [q for q in adj[p] if frozenset((p, q)) not in used]

    ends = [p for p in adj if len(adj[p]) == 1]
    junctions = [p for p in adj if len(adj[p]) >= 3]
    starts = ends + junctions + sorted(adj)  # sorted: top-left first
    paths: list[list[tuple[int, int]]] = [[p] for p in adj if not adj[p]]
    for start in starts:
        while free(start):
            path, cur, heading = [start], start, None
            while nxt := free(cur):
                # Prefer the straightest continuation so junctions are crossed naturally.
                if heading is not None:
                    nxt.sort(key=lambda q: -_cos(heading, (q[0] - cur[0], q[1] - cur[1])))
                    turn = _cos(heading, (nxt[0][0] - cur[0], nxt[0][1] - cur[1]))
                    if len(adj[cur]) >= 3 and turn < _MIN_JUNCTION_COS:
                        break  # sharp turn at a junction: end here, branches get own strokes
                q = nxt[0]
                used.add(frozenset((cur, q)))
                heading, cur = (q[0] - cur[0], q[1] - cur[1]), q
                path.append(q)
            paths.append(path)
    polylines = [np.array([(c, r) for r, c in p], dtype=np.float64) for p in paths]
    kept = [p for p in polylines if len(p) >= min_points]
    if not kept and polylines:
        kept = [max(polylines, key=len)]
    return kept


def _cos(a: tuple[int, int], b: tuple[int, int]) -> float:
    return (a[0] * b[0] + a[1] * b[1]) / math.hypot(*a) / math.hypot(*b)


def vectorize_digit(image: np.ndarray, threshold: float = 0.5, min_points: int = 3) -> Sketch:
    """Vectorise one grayscale digit (white on black, uint8 or [0, 1] floats) into strokes."""
    img = np.asarray(image, dtype=np.float64)
    if img.max() > 1.0:
        img = img / 255.0
    skel = skeletonize(img > threshold)
    return trace_skeleton(skel, min_points)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def _convert(images: np.ndarray, threshold: float) -> tuple[list[np.ndarray], np.ndarray]:
    seqs, ok = [], []
    for i, img in enumerate(images):
        strokes = vectorize_digit(img, threshold)
        if strokes:  # blank images have no strokes
            seqs.append(strokes_to_stroke3(strokes).astype(np.int16))
            ok.append(i)
    return seqs, np.array(ok, dtype=np.int64)


def convert_mnist_to_vmnist(
    mnist_dir: str | Path,
    out_dir: str | Path,
    valid_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    threshold: float = 0.5,
) -> Path:
    """Convert MNIST IDX files in ``mnist_dir`` into ``<out_dir>/vmnist.npz``; returns its path.

    Needs ``train-images-idx3-ubyte[.gz]`` and ``t10k-images-idx3-ubyte[.gz]``; label files
    (``*-labels-idx1-ubyte[.gz]``) are used when present. ``limit`` caps images per file.
    """
    src = Path(mnist_dir)
    splits: dict[str, list[np.ndarray]] = {}
    labels: dict[str, np.ndarray] = {}
    for prefix, names in (("train", ("train", "valid")), ("t10k", ("test",))):
        img_path = _find_idx(src, f"{prefix}-images-idx3-ubyte")
        if img_path is None:
            raise FileNotFoundError(f"missing {src}/{prefix}-images-idx3-ubyte[.gz] (MNIST IDX)")
        images = read_idx(img_path)[:limit]
        lab_path = _find_idx(src, f"{prefix}-labels-idx1-ubyte")
        labs = read_idx(lab_path)[:limit].astype(np.int64) if lab_path else np.full(len(images), -1)
        seqs, ok = _convert(images, threshold)
        labs = labs[ok]
        if prefix == "t10k":
            splits["test"], labels["test_labels"] = seqs, labs
            continue
        sizes = (int(round(valid_fraction * len(seqs))), None)  # valid first, train the rest
        for part, name in enumerate((names[1], names[0])):
            idx = np.sort(seeded_split(len(seqs), sizes, part, seed))
            splits[name] = [seqs[i] for i in idx]
            labels[f"{name}_labels"] = labs[idx]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_stroke3_npz(out / VMNIST_FILE, splits, labels)
    return out / VMNIST_FILE


def main(argv: list[str] | None = None) -> None:
    """CLI: convert MNIST IDX files into VMNIST stroke data."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mnist-dir", required=True, help="directory with the MNIST IDX files")
    ap.add_argument("--out", required=True, help="output directory (writes vmnist.npz)")
    ap.add_argument("--valid-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="max images per IDX file")
    ap.add_argument("--threshold", type=float, default=0.5, help="binarisation threshold in [0, 1]")
    args = ap.parse_args(argv)
    path = convert_mnist_to_vmnist(
        args.mnist_dir, args.out, args.valid_fraction, args.seed, args.limit, args.threshold
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
