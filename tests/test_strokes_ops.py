import numpy as np
import pytest
import torch

from sparsediff.data.sketch_ops import (
    normalize_strokes,
    preprocess_strokes,
    rdp,
    resample_stroke,
    sequence_to_strokes,
    sequences_to_sketches,
    stroke3_to_strokes,
    strokes_to_sequence,
    strokes_to_stroke3,
    validate_sketch,
)


def _random_sketch(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(n, 2)) for n in (5, 1, 8, 2)]


@pytest.mark.parametrize("representation", ["velocity", "absolute"])
def test_round_trip_strokes_sequence_strokes(representation):
    sketch = _random_sketch()
    seq = strokes_to_sequence(sketch, representation)
    assert seq.shape == (16, 3) and seq.dtype == np.float32
    assert seq[:, 2].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]
    back = sequence_to_strokes(seq, representation)
    assert [len(s) for s in back] == [5, 1, 8, 2]
    for a, b in zip(sketch, back):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_velocity_first_row_is_offset_from_origin():
    seq = strokes_to_sequence([np.array([[2.0, 3.0], [4.0, 3.0]])], "velocity")
    np.testing.assert_allclose(seq, [[2, 3, 0], [2, 0, 1]])


def test_sequence_to_strokes_pen_threshold_and_tensor_input():
    seq = torch.tensor([[0, 0, 0.0], [1, 0, 0.7], [1, 0, 0.9], [0, 1, 0.1]])
    assert [len(s) for s in sequence_to_strokes(seq, "velocity")] == [3, 1]
    assert [len(s) for s in sequence_to_strokes(seq, "velocity", pen_threshold=0.5)] == [2, 1, 1]
    assert sequence_to_strokes(np.zeros((0, 3))) == []


def test_sequences_to_sketches_respects_lengths():
    a = strokes_to_sequence([np.array([[0, 0], [1, 1.0]])])
    x = np.zeros((2, 4, 3), np.float32)
    x[0, :2] = a
    x[1, :1] = [5, 5, 1]
    x[0, 2:] = 99  # garbage in padding must be ignored
    sk = sequences_to_sketches(torch.from_numpy(x), torch.tensor([2, 1]))
    assert len(sk[0]) == 1 and np.allclose(sk[0][0], [[0, 0], [1, 1]])
    assert np.allclose(sk[1][0], [[5, 5]])


def test_stroke3_conversions():
    s3 = np.array([[10, 5, 0], [2, 0, 1], [-4, 3, 0], [0, 1, 0]], dtype=np.int16)
    strokes = stroke3_to_strokes(s3)
    assert len(strokes) == 2  # trailing points without a pen-up form a last stroke
    np.testing.assert_allclose(strokes[0], [[10, 5], [12, 5]])
    np.testing.assert_allclose(strokes[1], [[8, 8], [8, 9]])
    back = strokes_to_stroke3(strokes)
    np.testing.assert_allclose(back[:, :2], s3[:, :2])
    assert back[:, 2].tolist() == [0, 1, 0, 1]


def test_resample_unit_line_step_01_gives_11_even_points():
    line = np.array([[0.0, 0.0], [0.3, 0.0], [0.3, 0.0], [1.0, 0.0]])  # duplicate point inside
    out = resample_stroke(line, 0.1)
    assert out.shape == (11, 2)
    np.testing.assert_allclose(out[:, 0], np.linspace(0, 1, 11), atol=1e-12)
    np.testing.assert_allclose(out[:, 1], 0)


def test_resample_polyline_evenly_spaced_along_arc():
    corner = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    out = resample_stroke(corner, 0.25)
    assert len(out) == 9
    np.testing.assert_allclose(
        np.linalg.norm(np.diff(out, axis=0), axis=1)[[0, 1, 2, 5, 6, 7]], 0.25
    )
    assert any(np.allclose(p, [1, 0]) for p in out)


def test_resample_short_and_degenerate_strokes():
    short = np.array([[0.0, 0.0], [0.01, 0.02], [0.03, 0.0]])
    np.testing.assert_allclose(resample_stroke(short, 0.1), [[0, 0], [0.03, 0]])
    assert resample_stroke(np.array([[1.0, 1.0], [1.0, 1.0]]), 0.1).shape == (1, 2)
    with pytest.raises(ValueError):
        resample_stroke(short, 0.0)


def test_rdp_collinear_collapses_to_endpoints():
    pts = np.stack([np.linspace(0, 1, 10), np.linspace(0, 2, 10)], 1)
    np.testing.assert_allclose(rdp(pts, 1e-6), [[0, 0], [1, 2]])


def test_rdp_right_angle_keeps_corner_and_drops_noise():
    pts = np.array([[0, 0], [0.5, 0.01], [1, 0], [1, 0.5], [1.01, 0.7], [1, 1.0]])
    np.testing.assert_allclose(rdp(pts, 0.05), [[0, 0], [1, 0], [1, 1]])
    assert len(rdp(pts, 0.0)) == 6


def test_normalize_centres_and_scales_to_unit_extent():
    sk = [np.array([[10.0, 20.0], [30.0, 20.0]]), np.array([[20.0, 30.0]])]
    out = normalize_strokes(sk)
    pts = np.concatenate(out)
    np.testing.assert_allclose(pts.min(0) + pts.max(0), 0, atol=1e-12)
    assert np.ptp(pts, axis=0).max() == pytest.approx(1.0)
    assert np.ptp(pts[:, 1]) == pytest.approx(0.5)  # aspect ratio kept


def test_preprocess_pipeline_order():
    sk = [np.array([[0.0, 0.0], [100.0, 0.0]]), np.array([[0.0, 50.0], [0.0, 50.0]])]
    out = preprocess_strokes(sk, step=0.1, rdp_epsilon=None)
    assert [len(s) for s in out] == [11, 1]
    out = preprocess_strokes(sk, step=0.1, rdp_epsilon=0.01)
    assert [len(s) for s in out] == [2, 1]


@pytest.mark.parametrize(
    "bad,reason",
    [
        ([], "empty"),
        ([np.zeros((0, 2))], "empty_stroke"),
        ([np.zeros((3, 3))], "bad_shape"),
        ([np.array([[0.0, np.nan]])], "nonfinite"),
    ],
)
def test_validate_sketch_reasons(bad, reason):
    assert validate_sketch(bad) == reason
    assert validate_sketch([np.zeros((1, 2))]) is None
