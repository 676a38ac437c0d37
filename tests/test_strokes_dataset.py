import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from sparsediff.data.sketch_ops import strokes_to_sequence
from sparsediff.data.splits import fraction_sizes, seeded_split
from sparsediff.data.stroke_dataset import (
    SPLITS,
    StrokeSequenceDataset,
    collate_sequences,
    load_stroke_dataset,
)
from sparsediff.data.strokes import save_stroke3_npz


def _square_s3(side, n_strokes=1):
    """Stroke-3 of a square outline drawn n_strokes times over itself."""
    corners = np.array([[0, 0], [side, 0], [side, side], [0, side], [0, 0]], float)
    strokes = [corners] * n_strokes
    return strokes_to_sequence(strokes).astype(np.int16)


@pytest.fixture
def npz_path(tmp_path):
    path = tmp_path / "square.npz"
    train = [_square_s3(10), _square_s3(20, 2), np.zeros((0, 3), np.int16), _square_s3(5, 40)]
    save_stroke3_npz(path, {"train": train, "valid": [_square_s3(7)], "test": [_square_s3(9)]})
    return path


def test_collate_pads_with_zeros_and_returns_lengths():
    seqs = [torch.ones(3, 3), torch.full((5, 3), 2.0), torch.ones(1, 3)]
    batch = collate_sequences(seqs)
    assert batch["x"].shape == (3, 5, 3) and batch["x"].dtype == torch.float32
    assert batch["lengths"].tolist() == [3, 5, 1] and batch["lengths"].dtype == torch.long
    assert batch["x"][0, 3:].abs().sum() == 0 and batch["x"][2, 1:].abs().sum() == 0
    torch.testing.assert_close(batch["x"][1], seqs[1])
    assert set(batch) == {"x", "lengths"}
    half = collate_sequences([torch.ones(2, 3, dtype=torch.float16), torch.ones(1, 3).half()])
    assert half["x"].dtype == torch.float16 and half["x"][1, 1].abs().sum() == 0


def test_stroke3_dataset_keeps_splits_and_reports(npz_path):
    ds = load_stroke_dataset("stroke3", str(npz_path), "train", step=0.25, max_len=100)
    # unit square, perimeter 4 -> 16 segments per drawing (+1 start point)
    assert ds.lengths.tolist() == [17, 34] and ds.lengths.dtype == np.int64
    assert ds.report.total == 4 and ds.report.kept == 2
    assert ds.report.skipped == {"empty": 1, "too_long": 1}
    item = ds[0]
    assert item.dtype == torch.float32 and item.shape == (17, 3)
    assert float(item[:, 2].sum()) == 1.0 and float(item[-1, 2]) == 1.0
    # velocity rows sum to the last position; the sketch is centred with unit extent
    pts = np.concatenate(ds.strokes(0))
    np.testing.assert_allclose(pts.min(0), -0.5, atol=1e-6)
    np.testing.assert_allclose(pts.max(0), 0.5, atol=1e-6)
    assert len(load_stroke_dataset("stroke3", str(npz_path), "val")) == 1
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_sequences)
    batch = next(iter(loader))
    assert batch["x"].shape == (2, 34, 3) and batch["lengths"].tolist() == [17, 34]


def test_absolute_representation_and_directory_category(npz_path):
    ds = load_stroke_dataset(
        "stroke3", str(npz_path.parent), "test", category="square", representation="absolute"
    )
    seq = ds[0].numpy()
    assert ds.representation == "absolute"
    assert np.abs(seq[:, :2]).max() == pytest.approx(0.5, abs=1e-6)  # positions, not deltas


def test_empty_dataset_and_bad_arguments_raise(npz_path, tmp_path):
    with pytest.raises(ValueError, match="empty stroke dataset"):
        load_stroke_dataset("stroke3", str(npz_path), "train", max_len=5)
    with pytest.raises(ValueError, match="source"):
        load_stroke_dataset("svgz", str(npz_path), "train")
    with pytest.raises(ValueError, match="split"):
        load_stroke_dataset("stroke3", str(npz_path), "dev")
    with pytest.raises(ValueError, match="category"):
        load_stroke_dataset("stroke3", str(tmp_path), "train")


def test_missing_paths_say_where_to_get_data(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sketchrnn/<category>\.npz"):
        load_stroke_dataset("stroke3", str(tmp_path / "cat.npz"), "train")
    with pytest.raises(FileNotFoundError, match=r"simplified/<category>\.ndjson") as err:
        load_stroke_dataset("ndjson", str(tmp_path), "train", category="cat")
    assert "cat.ndjson" in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"python -m sparsediff\.data\.vmnist"):
        load_stroke_dataset("vmnist", str(tmp_path), "train")
    with pytest.raises(ValueError, match="needs a path"):
        load_stroke_dataset("stroke3", None, "train")


def split_indices(n, split, fractions=(0.8, 0.1, 0.1), seed=0):
    """The stroke datasets' split: sorted indices of a seeded train/valid/test partition."""
    return np.sort(seeded_split(n, fraction_sizes(n, fractions), SPLITS.index(split), seed))


def test_split_indices_disjoint_cover_and_seeded():
    parts = [split_indices(50, s, (0.8, 0.1, 0.1), seed=3) for s in ("train", "valid", "test")]
    assert [len(p) for p in parts] == [40, 5, 5]
    assert sorted(np.concatenate(parts).tolist()) == list(range(50))
    np.testing.assert_array_equal(parts[1], split_indices(50, "valid", seed=3))
    assert not np.array_equal(parts[1], split_indices(50, "valid", seed=4))
    perm = np.random.default_rng(3).permutation(50)  # pinned: sorted slices of one permutation
    np.testing.assert_array_equal(parts[1], np.sort(perm[40:45]))


def test_ndjson_dataset_seeded_split(tmp_path):
    lines = [
        json.dumps({"word": w, "drawing": [[[0, 10 + i], [0, 5]]]})
        for i in range(20)
        for w in ("cat", "dog")
    ]
    (tmp_path / "mixed.ndjson").write_text("\n".join(lines))
    path = str(tmp_path / "mixed.ndjson")
    sizes = [
        len(
            load_stroke_dataset(
                "ndjson", path, s, category="cat", split_fractions=(0.5, 0.25, 0.25)
            )
        )
        for s in ("train", "valid", "test")
    ]
    assert sizes == [10, 5, 5]


def test_kanjivg_default_source_small_limit():
    parts = [
        load_stroke_dataset("kanjivg", None, s, limit=20, seed=1)
        for s in ("train", "valid", "test")
    ]
    assert [len(p) for p in parts] == [16, 2, 2]
    seqs = {p[i].numpy().tobytes() for p in parts for i in range(len(p))}
    assert len(seqs) == 20  # disjoint splits
    lengths = np.concatenate([p.lengths for p in parts])
    assert lengths.max() <= 300 and lengths.min() >= 20


def test_items_are_copies():
    ds = StrokeSequenceDataset([np.ones((2, 3))])
    ds[0].mul_(0)
    assert float(ds[0].sum()) == 6.0
