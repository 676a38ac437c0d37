import numpy as np
import pytest
from conftest import write_idx
from skimage.draw import ellipse

from sparsediff.data.stroke_dataset import load_stroke_dataset
from sparsediff.data.strokes import load_npz_safe
from sparsediff.data.vmnist import (
    convert_mnist_to_vmnist,
    main,
    trace_skeleton,
    vectorize_digit,
)


def _one():
    img = np.zeros((28, 28), np.uint8)
    img[5:23, 13:16] = 255
    return img


def _zero():
    img = np.zeros((28, 28), np.uint8)
    img[ellipse(14, 14, 10, 7)] = 255
    img[ellipse(14, 14, 7, 4)] = 0  # ring 3 px thick
    return img


def test_vectorize_one_is_a_single_vertical_stroke():
    strokes = vectorize_digit(_one())
    assert len(strokes) == 1
    s = strokes[0]
    np.testing.assert_allclose(s[:, 0], 14)  # centre column of the 3-px bar
    assert np.ptp(s[:, 1]) >= 14
    assert s[0, 1] < s[-1, 1]  # traced from the top end
    assert (np.abs(np.diff(s, axis=0)).max(axis=1) == 1).all()  # 8-connected steps


def test_vectorize_zero_is_one_closed_loop():
    strokes = vectorize_digit(_zero())
    assert len(strokes) == 1
    s = strokes[0]
    np.testing.assert_allclose(s[0], s[-1])  # closed
    assert 8 <= np.ptp(s[:, 0]) <= 14 and 14 <= np.ptp(s[:, 1]) <= 20
    assert len(s) > 30
    assert vectorize_digit(np.zeros((28, 28), np.uint8)) == []


def test_trace_skeleton_crossing_is_walked_straight():
    skel = np.zeros((11, 11), bool)
    skel[5, :] = True
    skel[:, 5] = True  # a "+": one 4-way junction
    strokes = trace_skeleton(skel)
    assert sorted(len(s) for s in strokes) == [11, 11]
    # Each stroke is a straight bar: constant x (vertical) or constant y (horizontal).
    assert sorted(int(np.ptp(s[:, 0]) == 0) + 2 * int(np.ptp(s[:, 1]) == 0) for s in strokes) == [
        1,
        2,
    ]
    t = skel.copy()
    t[6:, 5] = False  # a "T": the stem stops at the junction, the bar stays whole
    stem, bar = sorted(trace_skeleton(t), key=len)
    assert len(stem) == 6 and len(bar) == 11
    np.testing.assert_allclose(bar[:, 1], 5)
    np.testing.assert_allclose(stem[:, 0], 5)


def test_convert_mnist_to_vmnist_and_load(tmp_path):
    src, out = tmp_path / "mnist", tmp_path / "vmnist"
    src.mkdir()
    train = np.stack([_one(), _zero(), _one(), _zero(), np.zeros((28, 28), np.uint8)])
    write_idx(src / "train-images-idx3-ubyte.gz", train)
    write_idx(src / "train-labels-idx1-ubyte.gz", np.array([1, 0, 1, 0, 7]))
    write_idx(src / "t10k-images-idx3-ubyte", np.stack([_zero(), _one()]))  # not gzipped
    main(["--mnist-dir", str(src), "--out", str(out), "--valid-fraction", "0.25"])
    data = load_npz_safe(out / "vmnist.npz")
    assert len(data["train"]) == 3 and len(data["valid"]) == 1  # blank image dropped
    assert data["train"][0].dtype == np.int16 and data["train"][0].shape[1] == 3
    assert sorted(np.concatenate([data["train_labels"], data["valid_labels"]])) == [0, 0, 1, 1]
    # valid = the first round(0.25 * 4) = 1 of the seed-0 permutation of the 4 kept digits
    first = np.random.default_rng(0).permutation(4)[0]
    assert data["valid_labels"].tolist() == [[1, 0, 1, 0][first]]
    assert data["test_labels"].tolist() == [-1, -1]  # no t10k label file
    ds = load_stroke_dataset("vmnist", str(out), "test")
    assert len(ds) == 2 and ds.report.kept == 2
    # The '1' is a vertical line after normalisation: x stays at 0, y spans the unit extent.
    pts = np.concatenate(ds.strokes(1))
    assert np.ptp(pts[:, 0]) < 1e-5 and np.ptp(pts[:, 1]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        convert_mnist_to_vmnist(tmp_path / "empty", out)
