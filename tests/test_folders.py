"""Never lose a user's files (docs/guarantees.md): what --overwrite may delete, where outputs
may go, and the locks that let processes work side by side."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsediff.cli import main
from sparsediff.folders import RUN_ENTRIES, foreign
from sparsediff.locks import LockedError, hold, wait_for
from sparsediff.pipelines import PIPELINES
from sparsediff.study.results import read_results
from sparsediff.workflows.run import run_entries

CHIRO = ["train.progress=false", "train.device=cpu", "data.max_train=24"]


def _train(preset, run_dir, sets=CHIRO, *flags):
    args = ["train", preset, "--run-dir", str(run_dir), "--threads", "1", *flags]
    for s in sets:
        args += ["--set", s]
    return main(args)


def _refused(capsys, code, *names):
    out = capsys.readouterr()
    assert code == 2, out
    assert "Traceback" not in out.err and len(out.err.strip().splitlines()) == 1, out.err
    for name in names:
        assert str(name) in out.err, (name, out.err)
    return out.err


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.fixture(scope="module")
def chiro_run(tmp_path_factory):
    """A finished chirodiff-tiny run, sampled and with a user's file kept elsewhere."""
    run = tmp_path_factory.mktemp("chiro") / "run"
    assert _train("chirodiff-tiny", run) == 0
    return run


def test_a_folder_that_is_not_a_run_is_never_deleted(tmp_path, capsys):
    user = tmp_path / "userdir"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "data.csv").write_text("1,2")
    before = _tree(user)
    _refused(capsys, _train("chirodiff-tiny", user), user, "notes.txt", "sub")
    _refused(capsys, _train("chirodiff-tiny", user, CHIRO, "--overwrite"), user, "notes.txt")
    assert _tree(user) == before
    # a user's own config.json is no run record either
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"mine": 1}')
    _refused(capsys, _train("chirodiff-tiny", tmp_path / "cfg", CHIRO, "--overwrite"), "record")
    assert (tmp_path / "cfg" / "config.json").read_text() == '{"mine": 1}'


def test_overwrite_deletes_a_runs_files_and_refuses_when_a_user_added_one(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("chirodiff-tiny", run) == 0
    (run / "my-notes.txt").write_text("mine")
    _refused(capsys, _train("chirodiff-tiny", run, CHIRO, "--overwrite"), run, "my-notes.txt")
    assert (run / "my-notes.txt").exists() and (run / "done.json").exists()
    (run / "my-notes.txt").unlink()
    assert _train("chirodiff-tiny", run, CHIRO, "--overwrite") == 0


@pytest.mark.parametrize("name", ["../../..", "/tmp/elsewhere", "a/b", "..", ".hidden"])
def test_a_run_name_is_never_a_path(tmp_path, capsys, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"config": {"pipeline": "chirodiff", "name": name}}))
    _refused(capsys, main(["train", str(preset), "--print-config"]), "name", "--run-dir")


def test_sample_writes_pngs_and_never_over_the_runs_files(chiro_run, tmp_path, capsys):
    config = (chiro_run / "config.json").read_text()
    for out in ("config.json", "samples.png", "done.json", "samples/x.png", "eval/a.png"):
        code = main(["sample", str(chiro_run), "--num", "2", "--out", str(chiro_run / out)])
        _refused(capsys, code, "--out")
    # through a link and '..' too
    (tmp_path / "link").symlink_to(chiro_run)
    code = main(["sample", str(chiro_run), "--out", str(tmp_path / "link" / ".." / "x.png")])
    assert code == 0 and (chiro_run.parent / "x.png").exists()  # the link, then '..'
    shutil.rmtree(chiro_run.parent / "x-svg")
    (chiro_run.parent / "x.png").unlink()
    capsys.readouterr()
    code = main(["sample", str(chiro_run), "--out", str(tmp_path / "link" / "samples.png")])
    _refused(capsys, code, "samples.png")
    _refused(capsys, main(["sample", str(chiro_run), "--out", str(tmp_path / "x.txt")]), ".png")
    assert (chiro_run / "config.json").read_text() == config
    assert main(["sample", str(chiro_run), "--num", "2", "--out", str(chiro_run / "mine.png")]) == 0
    assert (chiro_run / "mine.png").exists() and (chiro_run / "mine-svg").is_dir()
    assert foreign(chiro_run, run_entries()) == ["mine-svg", "mine.png"]  # a user's now
    shutil.rmtree(chiro_run / "mine-svg")
    (chiro_run / "mine.png").unlink()


def test_export_and_condense_never_touch_their_source(chiro_run, tmp_path, capsys):
    before = _tree(chiro_run)
    for command in ("export", "condense"):
        for out in (chiro_run, chiro_run.parent, chiro_run / "inside"):
            code = main([command, str(chiro_run), "--out", str(out), "--overwrite"])
            _refused(capsys, code, "--out")
    assert _tree(chiro_run) == before
    # an export replaces only an export, and only what the export wrote
    out = tmp_path / "export"
    assert main(["export", str(chiro_run), "--out", str(out)]) == 0
    assert main(["export", str(chiro_run), "--out", str(out), "--overwrite"]) == 0
    (out / "mine.txt").write_text("mine")
    _refused(capsys, main(["export", str(chiro_run), "--out", str(out), "--overwrite"]), "mine")
    assert (out / "mine.txt").exists()
    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("mine")
    _refused(capsys, main(["export", str(chiro_run), "--out", str(user), "--overwrite"]), user)
    assert (user / "README.md").read_text() == "mine"


def test_condense_refuses_a_run_with_nothing_to_remove(chiro_run, tmp_path, capsys):
    code = main(["condense", str(chiro_run), "--out", str(tmp_path / "c")])
    _refused(capsys, code, "not channel-sparse", "nothing written")
    assert not (tmp_path / "c").exists()


def test_a_second_writer_of_a_run_fails_at_once_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    with hold(run):
        err = _refused(capsys, _train("chirodiff-tiny", run), run, f"pid {os.getpid()}")
        assert "in use" in err
        with pytest.raises(LockedError, match="in use"), hold(run, shared=True):
            pass
    with hold(run, shared=True), hold(run, shared=True):  # readers side by side
        with pytest.raises(LockedError), hold(run):
            pass
    assert _train("chirodiff-tiny", run) == 0  # released with its holder


def test_a_lock_is_released_when_its_process_dies(tmp_path):
    lock = tmp_path / "x.lock"
    code = f"from sparsediff.locks import wait_for\nwith wait_for({str(lock)!r}, 'x'):\n"
    code += "    import os; os._exit(0)"  # no clean-up at all
    subprocess.run([sys.executable, "-c", code], check=True)
    with wait_for(lock, "x"):
        pass


def test_a_finished_run_holds_only_what_a_run_writes(chiro_run):
    assert foreign(chiro_run, run_entries()) == []
    # every pipeline's own entries are named, and none hides a user's file
    for pipeline in PIPELINES.values():
        assert all(not p.startswith("*") for p in pipeline.run_entries)
    assert all(not p.startswith("*") for p in RUN_ENTRIES)


def test_leftover_temporary_files_are_cleaned_on_resume(tmp_path):
    run = tmp_path / "run"
    assert _train("chirodiff-tiny", run, [*CHIRO, "train.stop_at=3"]) == 0
    leftover = run / ".checkpoint.pt.abc123.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert _train("chirodiff-tiny", run, [*CHIRO, "train.stop_at=3"], "--resume") == 0
    assert not leftover.exists()


DRIVER = """
import sys
import torch
from torch import nn
from sparsediff.workflows import evaluate, noise_floors
from sparsediff.study.sweep import run_study

class Features(nn.Module):
    num_features = 8
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
    def forward(self, images):
        x = images.float() / 127.5 - 1
        return self.conv(x.repeat(1, 3 // x.shape[1], 1, 1)).mean(dim=(2, 3))

def evaluate_fn(run_dir, num_samples, seed):
    return evaluate(run_dir, num_samples, seed=seed, feature_module=Features(),
                    cache_dir=sys.argv[3], progress=False).to_dict()

def floors_fn(run_dir):
    return noise_floors(run_dir, feature_module=Features(), cache_dir=sys.argv[3], progress=False)

torch.set_num_threads(1)
run_study(sys.argv[1], sys.argv[2], evaluate_fn=evaluate_fn, floors_fn=floors_fn,
          progress=False, only=sys.argv[4:])
"""


def test_two_study_processes_with_disjoint_cells_share_one_study(tmp_path, fmnist_dir):
    study = tmp_path / "s.toml"
    study.write_text(
        textwrap.dedent(f"""
        name = "two"
        methods = ["dense", "static"]
        sparsities = [0.5]
        [[datasets]]
        name = "fm"
        preset = "ldm-tiny"
        [datasets.overrides]
        "data.path" = "{fmnist_dir}"
        "train.progress" = false
        "train.device" = "cpu"
        "autoencoder.steps" = 6
        """)
    )
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out, cache = tmp_path / "study", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, str(driver), str(study), str(out), str(cache), cells],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for cells in ("fm/dense-*", "fm/static-*")
    ]
    errors = [p.communicate(timeout=600)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    assert not any("Traceback" in e for e in errors), errors
    ids = [r["id"] for r in read_results(out / "results.jsonl")]
    assert sorted(ids) == ["fm/dense-seed0", "fm/floors", "fm/static-s0.50-seed0"]
    # the shared first stage was trained once: by one cell, loaded by the other
    trained = [c for c in ids if (out / "runs" / c / "autoencoder-metrics.jsonl").exists()]
    assert len(trained) == 1, trained
