import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

from sparsediff.data.raster import rasterize, save_svg, strokes_to_svg
from sparsediff.imaging import save_image_grid

HLINE = [np.array([[0.0, 0.0], [1.0, 0.0]])]


def test_rasterize_shape_dtype_and_determinism():
    sk = [np.array([[0, 0], [3, 1], [2, 4.0]]), np.array([[5, 5.0]])]
    a, b = rasterize(sk), rasterize(sk)
    assert a.shape == (64, 64) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert rasterize(sk, size=32).shape == (32, 32)
    assert 0 < a.mean() < 128  # white ink on black background
    assert 0 < np.count_nonzero((a > 0) & (a < 255))  # anti-aliased edges


def test_horizontal_line_lights_the_middle_rows():
    img = rasterize(HLINE, size=64, line_width=2.0, padding=0.1)
    lit_rows = np.flatnonzero(img.max(axis=1) > 0)
    assert set(lit_rows) <= {30, 31, 32, 33}
    assert img[31].max() == 255 and img[32].max() == 255
    # the line spans the padded width 6.4 .. 57.6 (plus round caps), centred
    cols = np.flatnonzero(img[31] > 127)
    assert cols[0] in (5, 6) and cols[-1] in (57, 58)
    assert abs((cols[0] + cols[-1] + 1) / 2 - 32) <= 0.5


def test_vertical_line_keeps_aspect_and_lights_middle_columns():
    img = rasterize([np.array([[0.0, 0.0], [0.0, 1.0]])], size=64)
    np.testing.assert_array_equal(img, rasterize(HLINE, size=64).T)


def test_rasterize_empty_and_nonfinite_inputs():
    assert rasterize([]).max() == 0
    img = rasterize([np.array([[0, 0], [np.nan, 1], [1, 0]])])
    assert img.max() == 255  # NaN point dropped, rest drawn
    dot = rasterize([np.array([[2.0, 2.0]])], size=32)
    assert dot[15:17, 15:17].min() > 0 and dot.sum() < 255 * 12


def test_svg_output_and_files(tmp_path):
    sk = [np.array([[0, 0], [1, 0], [1, 1.0]]), np.array([[0.5, 0.5]])]
    svg = strokes_to_svg(sk, size=100, stroke_width=3)
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    polylines = root.findall(f"{ns}polyline")
    assert len(polylines) == 1 and len(root.findall(f"{ns}circle")) == 1
    pts = [tuple(map(float, p.split(","))) for p in polylines[0].get("points").split()]
    assert pts == [(10.0, 10.0), (90.0, 10.0), (90.0, 90.0)]
    assert save_svg(sk, tmp_path / "svg" / "a.svg", size=50) == tmp_path / "svg" / "a.svg"
    assert 'width="50"' in (tmp_path / "svg" / "a.svg").read_text()
    assert [p.name for p in (tmp_path / "svg").iterdir()] == ["a.svg"]  # no temp file left


def test_sketch_grid_via_imaging(tmp_path):
    sketches = [HLINE] * 5
    images = torch.from_numpy(np.stack([rasterize(sk, size=16) for sk in sketches]))[:, None]
    path = save_image_grid(images, tmp_path / "g.png", nrow=3, gap=2, fill=128)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 18 + 2, 3 * 18 + 2) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[2:18, 2:18], rasterize(HLINE, size=16))
    assert (grid[20:36, 38:54] == 128).all()  # sixth cell is unused: grey
    assert (grid[:2] == 128).all() and (grid[:, 18:20] == 128).all()  # mid-grey gaps
    assert [p.name for p in tmp_path.iterdir()] == ["g.png"]
    with pytest.raises(ValueError):
        save_image_grid(images[:0], tmp_path / "x.png")
