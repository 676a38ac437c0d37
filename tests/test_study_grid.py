"""Study TOML parsing and grid expansion."""

from collections import Counter
from pathlib import Path

import pytest

from sparsediff.study.grid import (
    cell_id,
    expand_grid,
    fmt_value,
    load_study,
    parse_study,
    preset_pipeline,
)

STUDIES = Path(__file__).resolve().parents[1] / "src" / "sparsediff" / "configs" / "studies"


def _study(**kw):
    raw = {
        "name": "t",
        "methods": ["dense", "static", "rigl", "magran"],
        "sparsities": [0.25, 0.5, 0.75],
        "prune_ratios": [0.05, 0.5],
        "seeds": [0, 1],
        "datasets": [
            {"name": "a", "preset": "ldm-a", "pipeline": "ldm"},
            {"name": "b", "preset": "chirodiff-b", "pipeline": "chirodiff"},
        ],
    }
    raw.update(kw)
    return parse_study(raw)


def test_grid_counts_per_method():
    cells = expand_grid(_study())
    # per dataset: dense 2 seeds, static 3x2, rigl and magran 3x2x2 each
    counts = Counter((c.dataset, c.method) for c in cells)
    for ds in ("a", "b"):
        assert counts[(ds, "dense")] == 2
        assert counts[(ds, "static")] == 6
        assert counts[(ds, "rigl")] == 12
        assert counts[(ds, "magran")] == 12
    assert len(cells) == 64
    assert len({c.id for c in cells}) == 64


def test_grid_subset_of_methods():
    cells = expand_grid(_study(methods=["dense", "magran"], seeds=[3]))
    assert Counter(c.method for c in cells) == {"dense": 2, "magran": 12}
    assert {c.seed for c in cells} == {3}


def test_cell_fields_and_ids():
    cells = {c.id: c for c in expand_grid(_study())}
    dense = cells["a/dense-seed1"]
    assert (dense.sparsity, dense.prune_ratio, dense.seed) == (0.0, None, 1)
    assert dense.overrides == {"sparse.method": "dense", "sparse.sparsity": 0.0, "seed": 1}
    static = cells["b/static-s0.25-seed0"]
    assert static.prune_ratio is None and "sparse.prune_ratio" not in static.overrides
    rigl = cells["a/rigl-s0.50-p0.05-seed0"]
    assert rigl.overrides["sparse.prune_ratio"] == 0.05
    assert rigl.overrides["sparse.method"] == "rigl"
    assert rigl.pipeline == "ldm" and rigl.preset == "ldm-a"
    assert "b/magran-s0.75-p0.50-seed1" in cells


def test_value_format_keeps_distinct_values_apart():
    assert fmt_value(0.5) == "0.50"
    assert fmt_value(0.005) == "0.005"
    assert fmt_value(0.125) == "0.125"
    assert cell_id("x", "rigl", 0.9, 0.005, 2) == "x/rigl-s0.90-p0.005-seed2"


def test_override_precedence_and_flattening(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text(
        """
methods = ["static"]
sparsities = [0.5]
[overrides]
"train.steps" = 10
eval.num_samples = 7
[[datasets]]
name = "d"
preset = "ldm-tiny"
overrides = { "train.steps" = 20, data = { path = "/x" } }
"""
    )
    study = load_study(toml)
    assert study.name == "s"  # the file's stem
    assert study.default_out_dir() == Path("studies/s")
    (cell,) = expand_grid(study)
    assert cell.overrides == {
        "train.steps": 20,
        "eval.num_samples": 7,
        "data.path": "/x",
        "sparse.method": "static",
        "sparse.sparsity": 0.5,
        "seed": 0,
    }


def test_pipeline_read_from_preset_file(tmp_path):
    preset = tmp_path / "ldm-but-not-really.toml"
    preset.write_text('pipeline = "chirodiff"\n')
    assert preset_pipeline(str(preset)) == "chirodiff"
    with pytest.raises(ValueError, match="unknown config"):
        preset_pipeline("chirodiff-nonexistent-preset")


@pytest.mark.parametrize(
    "change",
    [
        {"methods": ["dense", "set"]},
        {"sparsities": [0.5, 1.0]},
        {"sparsities": [0.5, 0.5]},
        {"prune_ratios": [0.0]},
        {"seeds": [0.5]},
        {"seeds": []},
        {"sparsities": []},
        {"prune_ratios": []},
        {"datasets": []},
        {"datasets": [{"name": "a/b", "preset": "x"}]},
        {"datasets": [{"name": "a", "preset": "x"}, {"name": "a", "preset": "y"}]},
        {"datasets": [{"name": "a", "preset": "x", "steps": 3}]},
        {"overrides": {"sparse": {"sparsity": 0.3}}},
        {"overrides": {"seed": 1}},
        {"eval": {"num_samples": "many"}},
        {"typo": 1},
    ],
)
def test_invalid_studies_are_rejected(change):
    with pytest.raises(ValueError):
        _study(**change)


def test_dense_only_study_needs_no_sparsities():
    cells = expand_grid(_study(methods=["dense"], sparsities=[], prune_ratios=[]))
    assert [c.id for c in cells] == [
        "a/dense-seed0",
        "a/dense-seed1",
        "b/dense-seed0",
        "b/dense-seed1",
    ]


@pytest.mark.parametrize(
    "name",
    [
        "ldm-celebahq",
        "ldm-lsun-bedrooms",
        "ldm-imagenette",
        "chirodiff-quickdraw",
        "chirodiff-kanjivg",
        "chirodiff-vmnist",
    ],
)
def test_paper_study_presets(name):
    study = load_study(STUDIES / f"{name}.toml")
    cells = expand_grid(study)
    assert [d.preset for d in study.datasets] == [name]
    assert study.sparsities == [0.1, 0.25, 0.5, 0.75, 0.9]
    assert study.prune_ratios == [0.05, 0.5]
    assert study.seeds == [0, 1, 2]
    assert len(cells) == 3 + 15 + 30 + 30
    assert study.datasets[0].pipeline == name.split("-")[0]


def test_quick_and_extended_presets():
    quick = load_study(STUDIES / "quick.toml")
    cells = expand_grid(quick)
    assert [d.preset for d in quick.datasets] == ["ldm-fashion-mnist", "chirodiff-kanjivg"]
    assert [c.id for c in cells] == [
        "fashion-mnist/dense-seed0",
        "fashion-mnist/rigl-s0.50-p0.05-seed0",
        "kanjivg/dense-seed0",
        "kanjivg/rigl-s0.50-p0.05-seed0",
    ]
    # a demonstration budget cut from the calibrated presets, which the evidence study uses as
    # they are (ldm-fashion-mnist: 4000 UNet steps, chirodiff-kanjivg: 4300)
    assert all(c.overrides["train.steps"] <= 1500 for c in cells)
    assert all(c.overrides["eval.num_samples"] == 64 for c in cells)
    evidence = load_study(STUDIES / "evidence.toml")
    assert all(not d.overrides for d in evidence.datasets)
    extended = load_study(STUDIES / "extended.toml")
    assert len(expand_grid(extended)) == 2 * (3 + 12 + 24 + 24)


def test_extra_cells_outside_the_cross_product():
    study = _study(
        methods=["dense", "rigl"],
        sparsities=[0.5, 0.9],
        prune_ratios=[0.05],
        seeds=[0, 1],
        extra_cells=[
            {"method": "rigl", "sparsity": 0.9, "prune_ratio": 0.5},  # p = 0.5 at 90% only
            {
                "variant": "small-dense",
                "method": "dense",
                "overrides": {"train.lr": 1e-3},
                "dataset_overrides": {"a": {"model.channels": [24, 24]}},
            },
            {
                "variant": "rigl-channel",
                "method": "rigl",
                "sparsity": 0.5,
                "prune_ratio": 0.05,
                "overrides": {"sparse.granularity": "channel"},
            },
            {
                "variant": "rigl-tied",
                "method": "rigl",
                "sparsity": 0.5,
                "prune_ratio": 0.05,
                "datasets": ["b"],  # dataset b only
            },
        ],
    )
    cells = {c.id: c for c in expand_grid(study)}
    # per dataset: dense 2 + rigl 2x2 + extras 3x2, and 2 more for dataset b
    assert len(cells) == 2 * (2 + 4 + 6) + 2
    assert "b/rigl-tied-s0.50-p0.05-seed1" in cells and "a/rigl-tied-s0.50-p0.05-seed1" not in cells
    assert "a/rigl-s0.90-p0.50-seed1" in cells and "a/rigl-s0.50-p0.50-seed0" not in cells
    small = cells["a/small-dense-seed1"]
    assert (small.method, small.variant, small.row, small.sparsity) == (
        "dense",
        "small-dense",
        "small-dense",
        0.0,
    )
    assert small.overrides == {
        "train.lr": 1e-3,
        "model.channels": [24, 24],
        "sparse.method": "dense",
        "sparse.sparsity": 0.0,
        "seed": 1,
    }
    assert "model.channels" not in cells["b/small-dense-seed1"].overrides  # dataset a only
    channel = cells["b/rigl-channel-s0.50-p0.05-seed0"]
    assert channel.overrides["sparse.granularity"] == "channel"
    assert channel.overrides["sparse.prune_ratio"] == 0.05
    assert cells["a/dense-seed0"].variant == "" and cells["a/dense-seed0"].row == "dense"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"method": "sgd"}, "method must be one of"),
        ({"method": "dense", "sparsity": 0.5}, "dense takes no sparsity"),
        ({"method": "static"}, "needs a sparsity"),
        ({"method": "rigl", "sparsity": 0.5}, "prune_ratio is for"),
        ({"method": "static", "sparsity": 0.5, "prune_ratio": 0.1}, "prune_ratio is for"),
        ({"method": "dense", "dataset_overrides": {"zz": {}}}, "keyed by datasets"),
        ({"method": "dense", "overrides": {"seed": 3}}, "which the grid controls"),
        ({"method": "dense", "colour": 1}, "unknown keys"),
        ({"method": "dense", "datasets": ["zz"]}, "datasets must be a non-empty list"),
        ({"method": "dense", "datasets": []}, "datasets must be a non-empty list"),
        ({"method": "dense", "variant": "a b"}, "variant"),
        ({"method": "static", "sparsity": 0.5, "variant": "dense"}, "another method's name"),
    ],
)
def test_bad_extra_cells_are_refused(extra, match):
    with pytest.raises(ValueError, match=match):
        _study(extra_cells=[extra])


def test_shipped_evidence_study_expands():
    cells = expand_grid(load_study(STUDIES / "evidence.toml"))
    per_dataset = Counter(c.dataset for c in cells)
    # dense, small-dense, static/rigl/magran at 25/50/90% (p 0.05), rigl/magran at 90% with
    # p 0.5, rigl-channel at 50%: 14 settings x 3 seeds; on Fashion-MNIST also rigl-channel
    # with the UNet's residual stream tied (the condensed network that samples 1.5x faster)
    assert per_dataset == {"fashion-mnist": 45, "kanjivg": 42}
    rows = Counter((c.dataset, c.row) for c in cells)
    assert rows[("fashion-mnist", "small-dense")] == 3
    assert rows[("fashion-mnist", "rigl-channel-tied")] == 3
