"""Running studies with fake train/evaluate functions: results, resume, failures, devices."""

import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from sparsediff.study.report import write_report
from sparsediff.study.results import append_result, jsonable, read_results
from sparsediff.study.sweep import StudyError, run_study, visible_devices

SCHEMA = {
    "id",
    "dataset",
    "preset",
    "pipeline",
    "method",
    "sparsity",
    "prune_ratio",
    "seed",
    "overrides",
    "metrics",
    "cost",
    "protocol",
    "samples_grid",
    "train_seconds",
    "eval_seconds",
    "run_dir",
}


def fake_train(preset, overrides, run_dir, resume):
    """Module level, so pool workers can unpickle it; leaves a trace in the run dir."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    time.sleep(0.5 if Path(run_dir).parent.name == "img" else 0)  # the slow dataset
    trace = {"resume": resume, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start}
    trace["end"] = time.time()
    with (run_dir / "calls.jsonl").open("a") as f:
        f.write(json.dumps(trace) + "\n")
    (run_dir / "overrides.json").write_text(json.dumps(overrides))
    (run_dir / "checkpoint.pt").write_text("weights")
    (run_dir / "done.json").write_text("{}")


def fake_evaluate(run_dir, num_samples, seed):
    overrides = json.loads((Path(run_dir) / "overrides.json").read_text())
    s = overrides["sparse.sparsity"]
    grid = Path(run_dir) / "samples.png"
    Image.new("RGB", (16, 16), (int(255 * s), 80, 160)).save(grid)
    dense_flops = 1000.0
    return {
        "metrics": {"fid": 10 + 20 * s**2 + overrides["seed"], "kid_mean": 0.01, "recall": 0.5},
        "cost": {
            "params_nonzero": 100 * (1 - s),
            "params_dense_total": 100,
            "train_flops": dense_flops * (1 - s),
            "train_flops_dense": dense_flops,
            "inference_flops": 10 * (1 - s),
            "inference_flops_dense": 10,
        },
        "protocol": {"num_samples": num_samples, "sampler": "ddim", "steps": 50, "eta": 0.0},
        "samples_grid": str(grid),
    }


def _write_study(tmp_path, body, name="s"):
    path = tmp_path / f"{name}.toml"
    path.write_text(body)
    return path


TWO_CELLS = """
name = "two"
methods = ["dense", "static"]
sparsities = [0.5]
[[datasets]]
name = "toy"
preset = "ldm-tiny"
overrides = { "train.steps" = 3 }
[eval]
num_samples = 64
seed = 5
"""


def test_two_cell_study_end_to_end(tmp_path):
    out = run_study(
        _write_study(tmp_path, TWO_CELLS),
        tmp_path / "out",
        train_fn=fake_train,
        evaluate_fn=fake_evaluate,
        progress=False,
    )
    assert out == tmp_path / "out"
    records = read_results(out / "results.jsonl")
    assert [r["id"] for r in records] == ["toy/dense-seed0", "toy/static-s0.50-seed0"]
    for r in records:
        assert SCHEMA <= set(r)
        assert r["protocol"]["num_samples"] == 64
        assert r["run_dir"] == f"runs/{r['id']}"
        assert r["samples_grid"] == f"runs/{r['id']}/samples.png"
        assert r["overrides"]["train.steps"] == 3
        # LDM cells share one first stage per dataset
        assert r["overrides"]["autoencoder.dir"] == "../../../shared/toy/autoencoder"
        assert r["resumed"] is False
    assert records[1]["prune_ratio"] is None and records[1]["sparsity"] == 0.5
    study = json.loads((out / "study.json").read_text())
    assert [c["id"] for c in study["cells"]] == [r["id"] for r in records]
    assert study["study"]["eval_seed"] == 5

    report = write_report(out)
    assert report == out / "report" / "report.md"
    text = report.read_text()
    assert "| FID ↓ / sparsity | 50% |" in text
    assert "| Dense | 10.00 |" in text
    assert "| Static | **15.00** |" in text
    for png in ("fid_vs_sparsity_toy.png", "fid_vs_train_flops_toy.png", "samples_toy.png"):
        assert (out / "report" / png).stat().st_size > 0
        assert f"]({png})" in text


def test_resume_skips_finished_and_resumes_interrupted(tmp_path):
    toml = _write_study(
        tmp_path,
        """
name = "r"
methods = ["dense", "static"]
sparsities = [0.25, 0.5, 0.75]
[[datasets]]
name = "toy"
preset = "ldm-tiny"
""",
    )
    out = tmp_path / "out"
    runs = out / "runs" / "toy"
    # dense: finished (has a results line)
    out.mkdir()
    append_result(out / "results.jsonl", {"id": "toy/dense-seed0", "metrics": {"fid": 1.0}})
    # static 0.25: trained (done.json) but never evaluated
    (runs / "static-s0.25-seed0").mkdir(parents=True)
    (runs / "static-s0.25-seed0" / "done.json").write_text("{}")
    (runs / "static-s0.25-seed0" / "overrides.json").write_text(
        json.dumps({"sparse.sparsity": 0.25, "seed": 0})
    )
    # static 0.5: interrupted (checkpoint, no done.json); static 0.75: never started
    (runs / "static-s0.50-seed0").mkdir(parents=True)
    (runs / "static-s0.50-seed0" / "checkpoint.pt").write_text("half")

    calls = []

    def counting_train(preset, overrides, run_dir, resume):
        calls.append((Path(run_dir).name, resume))
        fake_train(preset, overrides, run_dir, resume)

    run_study(toml, out, train_fn=counting_train, evaluate_fn=fake_evaluate, progress=False)
    assert sorted(calls) == [("static-s0.50-seed0", True), ("static-s0.75-seed0", False)]
    ids = [r["id"] for r in read_results(out / "results.jsonl")]
    assert sorted(ids) == sorted(
        [
            "toy/dense-seed0",
            "toy/static-s0.25-seed0",
            "toy/static-s0.50-seed0",
            "toy/static-s0.75-seed0",
        ]
    )
    by_id = {r["id"]: r for r in read_results(out / "results.jsonl")}
    assert by_id["toy/static-s0.50-seed0"]["resumed"] is True

    calls.clear()
    run_study(toml, out, train_fn=counting_train, evaluate_fn=fake_evaluate, progress=False)
    assert calls == []
    assert len(read_results(out / "results.jsonl")) == 4


def test_failing_cell_is_reported_and_others_finish(tmp_path):
    toml = _write_study(
        tmp_path,
        """
methods = ["dense", "static"]
sparsities = [0.5]
[[datasets]]
name = "toy"
preset = "ldm-tiny"
""",
    )

    def flaky_train(preset, overrides, run_dir, resume):
        if overrides["sparse.method"] == "dense":
            raise RuntimeError("out of memory")
        fake_train(preset, overrides, run_dir, resume)

    out = tmp_path / "out"
    with pytest.raises(StudyError) as err:
        run_study(toml, out, train_fn=flaky_train, evaluate_fn=fake_evaluate, progress=False)
    assert list(err.value.failed) == ["toy/dense-seed0"]
    assert "out of memory" in err.value.failed["toy/dense-seed0"]
    assert [r["id"] for r in read_results(out / "results.jsonl")] == ["toy/static-s0.50-seed0"]
    # a second run retries only the failed cell
    run_study(toml, out, train_fn=fake_train, evaluate_fn=fake_evaluate, progress=False)
    assert len(read_results(out / "results.jsonl")) == 2


def test_devices_run_in_workers_with_cuda_visible_devices(tmp_path):
    toml = _write_study(
        tmp_path,
        """
methods = ["dense", "static"]
sparsities = [0.5]
[[datasets]]
name = "img"
preset = "ldm-tiny"
[[datasets]]
name = "seq"
preset = "chirodiff-tiny"
""",
    )
    out = run_study(
        toml,
        tmp_path / "out",
        devices=["cuda:0", "cuda:1"],
        train_fn=fake_train,
        evaluate_fn=fake_evaluate,
        progress=False,
    )
    records = read_results(out / "results.jsonl")
    assert len(records) == 4
    spans = {}
    for r in records:
        assert r["device"] in ("cuda:0", "cuda:1")
        (trace,) = [json.loads(x) for x in (out / r["run_dir"] / "calls.jsonl").open()]
        assert trace["cuda"] == visible_devices(r["device"])
        spans[r["id"]] = (trace["start"], trace["end"])
    # the LDM dataset had no shared first stage yet: its cells ran one after the other
    first, second = sorted([spans["img/dense-seed0"], spans["img/static-s0.50-seed0"]])
    assert second[0] >= first[1]


def test_visible_devices():
    assert visible_devices("cuda:3") == "3"
    assert visible_devices("cuda") == "0"
    assert visible_devices("cpu") == ""
    assert visible_devices("2") == "2"


def test_results_file_survives_a_torn_line(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, {"id": "a", "metrics": {"fid": float("nan")}})
    with path.open("a") as f:
        f.write('{"id": "b", "metr')  # a crash mid-write
    append_result(path, {"id": "c"})
    records = read_results(path)
    assert [r["id"] for r in records] == ["a", "c"]
    assert records[0]["metrics"]["fid"] is None  # strict JSON: NaN becomes null


def test_jsonable_handles_paths_and_scalars():
    import numpy as np

    data = {"p": Path("/x"), "n": np.float32(1.5), "a": np.arange(2), "inf": float("inf")}
    assert jsonable(data) == {"p": "/x", "n": 1.5, "a": [0, 1], "inf": None}


def test_partial_training_is_not_evaluated(tmp_path):
    toml = _write_study(
        tmp_path,
        """
methods = ["dense"]
[[datasets]]
name = "toy"
preset = "ldm-tiny"
""",
    )

    def stops_early(preset, overrides, run_dir, resume):
        Path(run_dir, "checkpoint.pt").write_text("half")  # no done.json: not finished

    evaluated = []

    def evaluate(run_dir, num_samples, seed):
        evaluated.append(run_dir)
        return fake_evaluate(run_dir, num_samples, seed)

    out = tmp_path / "out"
    with pytest.raises(StudyError, match="toy/dense-seed0"):
        run_study(toml, out, train_fn=stops_early, evaluate_fn=evaluate, progress=False)
    assert evaluated == [] and read_results(out / "results.jsonl") == []
    run_study(toml, out, train_fn=fake_train, evaluate_fn=evaluate, progress=False)
    assert read_results(out / "results.jsonl")[0]["resumed"] is True


def test_a_bad_cell_config_fails_before_anything_runs(tmp_path):
    toml = _write_study(
        tmp_path,
        """
methods = ["dense"]
[overrides]
"train.stepz" = 3
[[datasets]]
name = "toy"
preset = "ldm-tiny"
""",
    )
    with pytest.raises(ValueError, match="cell toy/dense-seed0: .*train.stepz"):
        run_study(toml, tmp_path / "out", train_fn=fake_train, evaluate_fn=fake_evaluate)
    assert not (tmp_path / "out" / "runs").exists()


FLOOR_CALLS = []


def fake_floors(run_dir):
    FLOOR_CALLS.append(Path(run_dir).name)
    return {
        "floors": {"real_vs_real": {"fid": 2.0, "kid_mean": 0.0}, "autoencoder": {"fid": 4.0}},
        "protocol": {"reference": {"split": "test", "size": 64}},
    }


def test_floors_are_measured_once_per_dataset_and_parts_run_alone(tmp_path):
    toml = _write_study(
        tmp_path,
        TWO_CELLS.replace(
            'methods = ["dense", "static"]', 'methods = ["dense", "static"]\nseeds = [0, 1]'
        ),
    )
    kw = {"train_fn": fake_train, "evaluate_fn": fake_evaluate, "progress": False}
    FLOOR_CALLS.clear()
    out = run_study(toml, tmp_path / "out", floors_fn=fake_floors, only=["*-seed1"], **kw)
    ids = [r["id"] for r in read_results(out / "results.jsonl")]
    # only the seed-1 cells ran; the floors came right after the first finished cell, once
    assert ids == ["toy/dense-seed1", "toy/floors", "toy/static-s0.50-seed1"]
    assert FLOOR_CALLS == ["dense-seed1"]
    floors = read_results(out / "results.jsonl")[1]
    assert floors["kind"] == "floors" and floors["floors"]["autoencoder"]["fid"] == 4.0
    assert floors["run_dir"] == "runs/toy/dense-seed1"
    # the rest, in another "process": finished cells and the floors are skipped by their lines
    run_study(toml, tmp_path / "out", floors_fn=fake_floors, **kw)
    ids = [r["id"] for r in read_results(out / "results.jsonl")]
    assert ids[3:] == ["toy/dense-seed0", "toy/static-s0.50-seed0"]
    assert FLOOR_CALLS == ["dense-seed1"]
    text = write_report(out).read_text()
    assert "| Real vs real (floor) | 2.00 | 0.00 |" in text
    assert "| First-stage reconstructions vs real (floor) | 4.00 |" in text
    with pytest.raises(ValueError, match="no cell id matches"):
        run_study(toml, tmp_path / "out", only=["nothing/*"], **kw)
