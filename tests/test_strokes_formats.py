import json
import os
import pickle
import shlex

import numpy as np
import pytest

from sparsediff.data.strokes import (
    UnsafePickleError,
    list_kanjivg_files,
    load_kanjivg,
    load_ndjson,
    load_npz_safe,
    load_stroke3_npz,
    load_svg_strokes,
    parse_svg_path,
    save_stroke3_npz,
)


class _Evil:
    """Pickles into a call of os.system that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def _obj_array(items):
    arr = np.empty(len(items), dtype=object)
    for i, it in enumerate(items):
        arr[i] = it
    return arr


def _s3(n, pen_every=3):
    a = np.zeros((n, 3), np.int16)
    a[:, 0] = np.arange(n)
    a[:, 1] = 1
    a[pen_every - 1 :: pen_every, 2] = 1
    a[-1, 2] = 1
    return a


def test_stroke3_npz_round_trip_and_malformed_counted(tmp_path):
    path = tmp_path / "cat.npz"
    good = [_s3(5), _s3(7)]
    bad = [np.zeros((0, 3), np.int16), np.zeros((4, 2), np.int16), np.array([[1.0, np.nan, 1.0]])]
    save_stroke3_npz(path, {"train": good + bad, "valid": [_s3(4)], "test": [_s3(6)]})
    sketches, report = load_stroke3_npz(path, "train")
    assert len(sketches) == 2 and report.total == 5 and report.kept == 2
    assert report.skipped == {"empty": 1, "bad_shape": 1, "nonfinite": 1}
    np.testing.assert_allclose(sketches[0][0], np.cumsum(good[0][:3, :2], axis=0))
    assert sum(len(s) for s in sketches[1]) == 7
    assert len(load_stroke3_npz(path, "valid")[0]) == 1
    assert len(load_stroke3_npz(path, "train", limit=1)[0]) == 1
    with pytest.raises(ValueError, match="available"):
        load_stroke3_npz(path, "nope")


def test_npz_with_malicious_pickle_is_refused_without_side_effect(tmp_path):
    # The payload is live: a plain pickle round trip does run it.
    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Evil(armed)))
    assert armed.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    np.savez(path, train=_obj_array([_s3(3), _Evil(marker)]), valid=_obj_array([_s3(3)]))
    sketches, _ = load_stroke3_npz(path, "valid")  # only the asked member is decoded
    assert len(sketches) == 1
    with pytest.raises(UnsafePickleError, match="posix.system|os.system|nt.system"):
        load_stroke3_npz(path, "train")
    with pytest.raises(pickle.UnpicklingError):
        load_npz_safe(path)
    assert not marker.exists()


def test_npz_protocol2_pickle_and_plain_arrays_load(tmp_path):
    # Python-2-era sketch-rnn files use pickle protocol 2; write one by hand.
    arr = _obj_array([_s3(4), _s3(2)])
    npy = tmp_path / "train.npy"
    with open(npy, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": (2,)}
        )
        pickle.dump(arr, f, protocol=2)
    import zipfile

    path = tmp_path / "p2.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.write(npy, "train.npy")
        with zf.open("labels.npy", "w") as f:
            np.lib.format.write_array(f, np.arange(3, dtype=np.int64))
    data = load_npz_safe(path)
    np.testing.assert_array_equal(data["train"][0], _s3(4))
    np.testing.assert_array_equal(data["labels"], [0, 1, 2])


def test_ndjson_category_filter_and_malformed_lines(tmp_path):
    def drawing(n):
        return [[list(range(n)), list(range(n)), list(range(n))], [[5, 6], [7, 8]]]

    lines = [
        json.dumps({"word": "cat", "drawing": drawing(3)}),
        json.dumps({"word": "dog", "drawing": drawing(4)}),
        "{not json",
        json.dumps({"word": "cat", "drawing": [[[1, 2], [3]]]}),  # x/y mismatch
        json.dumps({"word": "cat", "drawing": []}),  # empty
        "",
        json.dumps({"word": "cat", "drawing": drawing(5)}),
    ]
    path = tmp_path / "mix.ndjson"
    path.write_text("\n".join(lines) + "\n")
    sketches, report = load_ndjson(path, category="cat")
    assert len(sketches) == 2
    assert report.skipped == {"json_error": 1, "bad_shape": 1, "empty": 1}
    np.testing.assert_allclose(sketches[0][0], [[0, 0], [1, 1], [2, 2]])  # t row ignored
    np.testing.assert_allclose(sketches[1][1], [[5, 7], [6, 8]])
    assert len(load_ndjson(path)[0]) == 3  # no filter: dog included
    assert len(load_ndjson(path, category="cat", limit=1)[0]) == 1


def test_svg_path_commands_absolute_relative_and_smooth():
    absolute = parse_svg_path("M0,0 C0,10 10,10 10,0 S20,-10 20,0")
    relative = parse_svg_path("m0,0c0,10 10,10 10,0s10-10 10,0")
    assert len(absolute) == 1
    np.testing.assert_allclose(absolute[0], relative[0], atol=1e-9)
    pts = absolute[0]
    np.testing.assert_allclose(pts[[0, -1]], [[0, 0], [20, 0]])
    # y(t) = +-30 t (1 - t): the first arch peaks at 7.5, the reflected S arch dips to -7.5
    assert pts[:, 1].max() == pytest.approx(7.5) and pts[:, 1].min() == pytest.approx(-7.5)
    lines = parse_svg_path("M1,1 L5,1 h2 v3 l-1,0 Z M9,9 10,10")
    np.testing.assert_allclose(lines[0], [[1, 1], [5, 1], [7, 1], [7, 4], [6, 4], [1, 1]])
    np.testing.assert_allclose(lines[1], [[9, 9], [10, 10]])  # implicit line-to after M
    with pytest.raises(ValueError):
        parse_svg_path("M0,0 C1,1")


def test_kanjivg_style_svg_written_by_test(tmp_path):
    svg = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.0//EN" "x.dtd" [
<!ATTLIST g xmlns:kvg CDATA #FIXED "http://kanjivg.tagaini.net" kvg:element CDATA #IMPLIED >
]>
<svg xmlns="http://www.w3.org/2000/svg" width="109" height="109" viewBox="0 0 109 109">
<g id="kvg:StrokePaths_test" style="fill:none;stroke:#000000;">
 <g id="kvg:test" kvg:element="X">
  <path id="kvg:test-s1" d="M10.5,20c10,0 50,0 80,0"/>
  <path id="kvg:test-s2" d="M50,10c0.5,20,0.5,60,0,80"/>
 </g>
</g>
<g id="kvg:StrokeNumbers_test"><text transform="matrix(1 0 0 1 5 5)">1</text></g>
</svg>"""
    (tmp_path / "0abcd.svg").write_text(svg)
    (tmp_path / "0abcd-Kaisho.svg").write_text(svg)
    (tmp_path / "09999.svg").write_text("<svg><path d='M0,0 A1,1 0 0 1 2,2'/></svg>")
    strokes = load_svg_strokes(tmp_path / "0abcd.svg")
    assert len(strokes) == 2
    np.testing.assert_allclose(strokes[0][[0, -1]], [[10.5, 20], [90.5, 20]])
    np.testing.assert_allclose(strokes[0][:, 1], 20)
    assert strokes[0][0, 0] < strokes[0][1, 0] < strokes[0][-1, 0]  # writing direction kept
    np.testing.assert_allclose(strokes[1][[0, -1]], [[50, 10], [50, 90]])
    files = list_kanjivg_files(tmp_path)
    assert [f.name for f in files] == ["09999.svg", "0abcd.svg"]
    assert len(list_kanjivg_files(tmp_path, exclude_variants=False)) == 3
    sketches, report = load_kanjivg(files)
    assert len(sketches) == 1 and report.skipped == {"parse_error": 1}


def test_real_kanjivg_files_from_package():
    files = list_kanjivg_files()
    assert len(files) > 6000 and all("-" not in f.stem for f in files)
    by_name = {f.name: f for f in files}
    one = load_svg_strokes(by_name["04e00.svg"])  # 一: a single horizontal stroke
    assert len(one) == 1
    assert np.ptp(one[0][:, 0]) > 5 * np.ptp(one[0][:, 1])
    assert one[0][0, 0] < one[0][-1, 0]  # drawn left to right
    assert len(load_svg_strokes(by_name["04e09.svg"])) == 3  # 三
    assert len(load_svg_strokes(by_name["06c38.svg"])) == 5  # 永
