"""Torch dataset of preprocessed pen sequences and the single loading entry point.

``load_stroke_dataset(source, path, split, ...)`` reads raw sketches from one of the
supported sources, preprocesses them (ChiroDiff style, see ``sketch_ops``), drops
sequences longer than ``max_len`` and returns a :class:`StrokeSequenceDataset`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from sparsediff.data import strokes as fmt
from sparsediff.data.sketch_ops import (
    DEFAULT_MAX_LEN,
    DEFAULT_PEN_THRESHOLD,
    DEFAULT_STEP,
    Sketch,
    check_representation,
    preprocess_strokes,
    sequence_to_strokes,
    strokes_to_sequence,
)
from sparsediff.data.splits import fraction_sizes, seeded_split
from sparsediff.data.strokes import LoadReport

SOURCES = ("kanjivg", "stroke3", "ndjson", "vmnist")
SPLITS = ("train", "valid", "test")
VMNIST_FILE = "vmnist.npz"

_QD = "https://storage.googleapis.com/quickdraw_dataset"
_MISSING_HELP = {
    "stroke3": (
        "QuickDraw sketch-rnn files are Google's Quick, Draw! dataset on GCS: "
        f"gs://quickdraw_dataset/sketchrnn/<category>.npz ({_QD}/sketchrnn/<category>.npz), "
        "e.g. `gsutil cp gs://quickdraw_dataset/sketchrnn/cat.npz data/quickdraw/`. "
        "Expected layout: <path>/<category>.npz (pass category=...) or the .npz file itself, "
        "holding object arrays train/valid/test of int16 (dx, dy, pen) rows."
    ),
    "ndjson": (
        "QuickDraw drawings are Google's Quick, Draw! dataset on GCS: "
        f"gs://quickdraw_dataset/full/simplified/<category>.ndjson "
        f"({_QD}/full/simplified/<category>.ndjson; raw files under full/raw/). "
        "Expected layout: <path>/<category>.ndjson (pass category=...) or the .ndjson file "
        "itself, one JSON object per line with 'word' and 'drawing'."
    ),
    "vmnist": (
        "VMNIST is made from the MNIST IDX files with our converter: "
        "`python -m sparsediff.data.vmnist --mnist-dir <dir> --out <path>` where <dir> holds "
        "train-images-idx3-ubyte[.gz], t10k-images-idx3-ubyte[.gz] (labels optional). "
        f"Expected layout: <path>/{VMNIST_FILE} (arrays train/valid/test in stroke-3 format) "
        "or the .npz file itself."
    ),
    "kanjivg": (
        "KanjiVG comes with `pip install kanjivg` (used when path is None); otherwise pass "
        "a directory of KanjiVG SVG files (<path>/<hex code>.svg)."
    ),
}


class StrokeSequenceDataset(Dataset):
    """Preprocessed pen sequences; item ``i`` is a float32 tensor ``(L_i, 3)``.

    Attributes: ``representation`` ("velocity"/"absolute"), ``lengths`` (int64 array of
    every ``L_i``, the empirical length distribution), ``report`` (:class:`LoadReport`).
    """

    def __init__(
        self,
        sequences: Sequence[np.ndarray],
        representation: str = "velocity",
        report: LoadReport | None = None,
    ) -> None:
        self.representation = check_representation(representation)
        self.sequences = [np.asarray(s, dtype=np.float32) for s in sequences]
        for s in self.sequences:
            if s.ndim != 2 or s.shape[1] != 3 or len(s) == 0:
                raise ValueError(f"sequences must be non-empty (L, 3) arrays, got {s.shape}")
        self.lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)
        self.report = report if report is not None else LoadReport()

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> torch.Tensor:
        # Copy: callers may noise/normalise the batch in place.
        return torch.from_numpy(self.sequences[index].copy())

    def strokes(self, index: int, pen_threshold: float = DEFAULT_PEN_THRESHOLD) -> Sketch:
        """Decode item ``index`` back into a sketch."""
        return sequence_to_strokes(self.sequences[index], self.representation, pen_threshold)


def collate_sequences(batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero-pad ``(L_i, 3)`` sequences to ``x`` ``(B, Lmax, 3)``; ``lengths`` ``(B,)`` long."""
    lengths = torch.tensor([len(s) for s in batch], dtype=torch.long)
    return {"x": pad_sequence(list(batch), batch_first=True), "lengths": lengths}


def _split_indices(
    n: int, split: str, fractions: tuple[float, float, float], seed: int
) -> np.ndarray:
    """Sorted indices of ``split`` in a seeded train/valid/test partition of ``range(n)``."""
    part = seeded_split(n, fraction_sizes(n, fractions), SPLITS.index(split), seed)
    return np.sort(part)


def _resolve(source: str, path: str | None, category: str | None, suffix: str) -> Path:
    if path is None:
        raise ValueError(f"source {source!r} needs a path. {_MISSING_HELP[source]}")
    p = Path(path).expanduser()
    if p.is_dir():
        name = f"{category}{suffix}" if category else (VMNIST_FILE if source == "vmnist" else None)
        if name is None:
            raise ValueError(f"{p} is a directory: pass category=... to pick <category>{suffix}")
        p = p / name
    if not p.is_file():
        raise FileNotFoundError(f"{source} data not found at {p}. {_MISSING_HELP[source]}")
    return p


@functools.lru_cache(maxsize=2)
def _kanjivg_raw(
    directory: str | None, exclude_variants: bool
) -> tuple[tuple[Sketch, ...], LoadReport]:
    # Parsing ~6.7k SVGs takes ~15 s; cache so train/valid/test loads parse once.
    files = fmt.list_kanjivg_files(directory, exclude_variants)
    sketches, report = fmt.load_kanjivg(files)
    return tuple(sketches), report


def _load_raw(
    source: str,
    path: str | None,
    split: str,
    category: str | None,
    limit: int | None,
    seed: int,
    fractions: tuple[float, float, float],
    exclude_variants: bool,
) -> tuple[list[Sketch], LoadReport]:
    if source == "stroke3":
        return fmt.load_stroke3_npz(_resolve(source, path, category, ".npz"), split, limit)
    if source == "vmnist":
        return fmt.load_stroke3_npz(_resolve(source, path, None, ".npz"), split, limit)
    if source == "ndjson":
        file = _resolve(source, path, category, ".ndjson")
        sketches, report = fmt.load_ndjson(file, category=category, limit=limit)
    elif source == "kanjivg":
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"KanjiVG directory not found: {path}. {_MISSING_HELP[source]}")
        files = fmt.list_kanjivg_files(path, exclude_variants)
        if limit is not None:  # a seeded subset, so limit does not bias towards low code points
            files = [files[i] for i in np.sort(seeded_split(len(files), (limit,), 0, seed))]
            sketches, report = fmt.load_kanjivg(files)
        else:
            cached, cached_report = _kanjivg_raw(path, exclude_variants)
            sketches, report = list(cached), copy.deepcopy(cached_report)
    else:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    idx = _split_indices(len(sketches), split, fractions, seed)
    return [sketches[i] for i in idx], report


def load_stroke_dataset(
    source: str,
    path: str | None = None,
    split: str = "train",
    *,
    representation: str = "velocity",
    category: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    step: float | None = DEFAULT_STEP,
    rdp_epsilon: float | None = None,
    max_len: int | None = DEFAULT_MAX_LEN,
    extent: float = 1.0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    exclude_variants: bool = True,
) -> StrokeSequenceDataset:
    """Load, preprocess and wrap one split of a pen-stroke data source.

    Args:
        source: "kanjivg" (default data; ``path`` None = the installed ``kanjivg`` package),
            "stroke3" (sketch-rnn ``.npz``), "ndjson" (QuickDraw) or "vmnist" (converted).
        path: file, or directory plus ``category`` (``<category>.npz``/``.ndjson``).
        split: "train", "valid" or "test" ("val" accepted). stroke3/vmnist keep the file's
            splits; kanjivg/ndjson are split with ``seed`` and ``split_fractions``.
        representation: "velocity" (dx, dy, pen) or "absolute" (x, y, pen).
        category: QuickDraw category (file name in a directory; ndjson also filters ``word``).
        limit: max raw sketches read (stroke3/vmnist: per split; kanjivg: a seeded subset
            before splitting; ndjson: first matching lines before splitting).
        step: arc-length resampling step in normalised units (None: no resampling).
        rdp_epsilon: optional RDP tolerance (normalised units) applied after resampling.
        max_len: sequences with more points are dropped (counted as "too_long").
        extent: size of the larger bounding-box side after normalisation.
        exclude_variants: KanjiVG only: skip variant files (names containing '-').

    The dataset's ``report`` counts entries read (``total``; for seeded splits: the whole
    source), malformed entries skipped per reason (whole source for seeded splits),
    ``too_long`` drops of this split, and ``kept`` = ``len(dataset)``.

    Raises:
        FileNotFoundError: the data is missing (the message says where to get it).
        ValueError: bad arguments, or no sketch survives loading/filtering.
    """
    split = "valid" if split == "val" else split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    check_representation(representation)
    sketches, report = _load_raw(
        source, path, split, category, limit, seed, split_fractions, exclude_variants
    )
    sequences = []
    for strokes in sketches:
        seq = strokes_to_sequence(
            preprocess_strokes(strokes, step, rdp_epsilon, extent), representation
        )
        if max_len is not None and len(seq) > max_len:
            report.skip("too_long")
            continue
        sequences.append(seq)
    report.kept = len(sequences)
    if not sequences:
        raise ValueError(
            f"empty stroke dataset: source={source!r} path={path!r} split={split!r} "
            f"category={category!r} ({report})"
        )
    return StrokeSequenceDataset(sequences, representation, report)
