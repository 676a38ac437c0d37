"""What survives a kill, what resume restores, and what bad input gets (docs/guarantees.md)."""

import json
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sparsediff import runtime
from sparsediff.cli import main
from sparsediff.data.strokes import load_npz_safe, load_stroke3_npz
from sparsediff.training.loop import Trainer
from sparsediff.workflows import run as run_module

VOLATILE = {"time", "steps_per_s", "update_time_s"}
LDM = [
    "train.progress=false",
    "train.device=cpu",
    "autoencoder.steps=4",
    "train.checkpoint_every=3",
]
CHIRO = ["train.progress=false", "train.device=cpu", "data.max_train=24"]


def _train(preset, run_dir, sets, *flags):
    args = ["train", preset, "--run-dir", str(run_dir), "--threads", "1", *flags]
    for s in sets:
        args += ["--set", s]
    return main(args)


def _records(path):
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    return [{k: v for k, v in json.loads(x).items() if k not in VOLATILE} for x in lines]


def _killed_at(monkeypatch, call):
    """Make the call-th optimizer step of the process (any stage) die as a kill would."""
    count = {"n": 0}
    step = Trainer._optimizer_step

    def dying(self, data):
        count["n"] += 1
        if count["n"] == call:
            raise KeyboardInterrupt
        return step(self, data)

    monkeypatch.setattr(Trainer, "_optimizer_step", dying)


def _kill_during_export(monkeypatch):
    def dying(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "write_grid", dying)  # after the weights, before done.json


def _same_run(a, b, logs):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa), "final weights differ"
    for log in logs:
        assert _records(a / log) == _records(b / log), log


@pytest.fixture(scope="module")
def ldm_straight(tmp_path_factory, fmnist_dir):
    run = tmp_path_factory.mktemp("ldm") / "straight"
    assert _train("ldm-tiny", run, [*LDM, f"data.path={fmnist_dir}"]) == 0
    return run


# optimizer-step calls: autoencoder 1-4 (checkpoint after 3), UNet 5-10 (checkpoint after 3)
@pytest.mark.parametrize(
    "kill",
    [2, 4, 5, 7, 9, "export"],
    ids=["stage1", "stage1-after-ckpt", "between-stages", "stage2", "stage2-after-ckpt", "export"],
)
def test_ldm_resume_is_exact_after_a_kill(tmp_path, fmnist_dir, ldm_straight, monkeypatch, kill):
    sets = [*LDM, f"data.path={fmnist_dir}"]
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _kill_during_export(m) if kill == "export" else _killed_at(m, kill)
        assert _train("ldm-tiny", run, sets) == 130
    assert not (run / "done.json").exists()
    assert _train("ldm-tiny", run, sets, "--resume") == 0
    _same_run(ldm_straight, run, ["metrics.jsonl", "autoencoder-metrics.jsonl"])


@pytest.mark.parametrize("kill", [2, 5, "export"])
def test_chirodiff_resume_is_exact_after_a_kill(tmp_path, monkeypatch, kill):
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert _train("chirodiff-tiny", straight, CHIRO) == 0
    with monkeypatch.context() as m:
        _kill_during_export(m) if kill == "export" else _killed_at(m, kill)
        assert _train("chirodiff-tiny", run, CHIRO) == 130
    assert _train("chirodiff-tiny", run, CHIRO, "--resume") == 0
    _same_run(straight, run, ["metrics.jsonl"])


def test_a_half_saved_autoencoder_of_an_older_version_is_redone(tmp_path, fmnist_dir, capsys):
    run = tmp_path / "run"
    (run / "autoencoder").mkdir(parents=True)
    (run / "autoencoder" / "config.json").write_text("{}")  # the weights never came
    sets = [*LDM, f"data.path={fmnist_dir}", "train.steps=2"]
    assert _train("ldm-tiny", run, sets) == 0
    assert "training it again" in capsys.readouterr().err
    assert (run / "autoencoder" / "diffusion_pytorch_model.safetensors").exists()


def test_a_run_directory_knows_what_it_holds(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("chirodiff-tiny", run, CHIRO, "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert _train("chirodiff-tiny", run, CHIRO) == 0
    assert _train("chirodiff-tiny", run, CHIRO) == 2  # no silent retraining
    assert "already holds a finished run" in capsys.readouterr().err
    changed = [*CHIRO, "train.lr=0.5", "sparse.sparsity=0.25"]
    assert _train("chirodiff-tiny", run, changed, "--resume") == 2
    err = capsys.readouterr().err
    assert "sparse.sparsity: 0.5 -> 0.25" in err and "train.lr: 0.001 -> 0.5" in err
    assert _train("chirodiff-tiny", run, [*CHIRO, "train.log_every=3"], "--resume") == 0
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["train"]["log_every"] == 3
    assert record["resumes"][0]["changed"] == {"train.log_every": [2, 3]}
    assert _train("chirodiff-tiny", run, CHIRO, "--overwrite") == 0
    assert "resumes" not in json.loads((run / "config.json").read_text())


def _bad_input(capsys, code, *names):
    out = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in out.err and len(out.err.strip().splitlines()) == 1, out.err
    for name in names:
        assert str(name) in out.err, (name, out.err)


@pytest.mark.parametrize(
    "setting, named",
    [
        ("train.log_every=0", "train.log_every"),
        ("train.device=tpu", "train.device"),
        ("train.lr=-1.0", "train.lr"),
        ("train.checkpoint_every=-1", "train.checkpoint_every"),
        ("diffusion.beta_end=1.5", "diffusion.beta"),
        ("sparse.sparsity=1.0", "sparse.sparsity"),
        ("eval.num_samples=1", "eval.num_samples"),
    ],
)
def test_bad_config_values_are_one_line_errors(tmp_path, capsys, setting, named):
    _bad_input(capsys, _train("chirodiff-tiny", tmp_path / "r", [setting]), named)


def test_bad_toml_names_the_file(tmp_path, capsys):
    preset = tmp_path / "broken.toml"
    preset.write_text("[train\nsteps = 3\n")
    _bad_input(capsys, _train(str(preset), tmp_path / "r", []), preset)


def test_truncated_npz_names_the_file(tmp_path, capsys):
    path = tmp_path / "cat.npz"
    np.savez(path, train=np.zeros((3, 3)), valid=np.zeros((3, 3)), test=np.zeros((3, 3)))
    path.write_bytes(path.read_bytes()[:100])
    sets = [*CHIRO, "data.name=stroke3", f"data.path={path}"]
    _bad_input(capsys, _train("chirodiff-tiny", tmp_path / "r", sets), path)


def test_corrupt_checkpoint_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("chirodiff-tiny", run, [*CHIRO, "train.stop_at=3"]) == 0
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    capsys.readouterr()
    _bad_input(capsys, _train("chirodiff-tiny", run, CHIRO, "--resume"), run / "checkpoint.pt")
    assert "weights_only" not in capsys.readouterr().err


def test_corrupt_weights_name_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert _train("chirodiff-tiny", run, CHIRO) == 0
    (run / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    capsys.readouterr()
    code = main(["sample", str(run), "--num", "2", "--out", str(tmp_path / "s.png")])
    _bad_input(capsys, code, run / "model.safetensors")


def test_unreadable_images_are_skipped_even_first(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        path = folder / f"img{i:02d}.png"
        if i % 3 == 0:  # every third one is corrupt, the first included
            path.write_bytes(b"\x89PNG broken")
        else:
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
    sets = [*LDM, "data.name=folder", f"data.path={folder}", "data.resolution=16"]
    sets += ["train.steps=2", "data.max_val=2", "data.max_train=0"]
    assert _train("ldm-tiny", tmp_path / "run", sets) == 0
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["skipped"] > 0
    assert "unreadable" in capsys.readouterr().err


def test_non_utf8_ndjson_lines_are_skipped_and_counted(tmp_path):
    from sparsediff.data.strokes import load_ndjson

    good = json.dumps({"word": "cat", "drawing": [[[0, 5, 9], [0, 4, 1]]]})
    path = tmp_path / "cat.ndjson"
    path.write_bytes(good.encode() + b"\n\xff\xfe broken\n" + good.encode() + b"\n")
    sketches, report = load_ndjson(path)
    assert len(sketches) == 2 and report.skipped["not_utf8"] == 1


def test_npz_reads_only_the_members_it_needs(tmp_path):
    path = tmp_path / "big.npz"
    strokes = np.empty(2, dtype=object)
    strokes[0] = strokes[1] = np.array([[0, 0, 0], [3, 4, 1]], dtype=np.int16)
    np.savez_compressed(path, train=strokes, junk=np.zeros(100_000_000, dtype=np.float32))
    tracemalloc.start()
    sketches, _ = load_stroke3_npz(path, "train")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(sketches) == 2 and peak < 20e6  # the unused 400 MB member is never decoded
    with pytest.raises(ValueError, match=r"junk.*more than the 1000"):
        load_npz_safe(path, ["junk"], max_bytes=1000)


def test_threads_default_is_half_the_cores(monkeypatch):
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 2)
    assert runtime.default_threads() == 1
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 64)
    assert runtime.default_threads() == 8


def test_a_run_and_the_places_it_shares_can_be_moved_together(tmp_path, fmnist_dir):
    from sparsediff.pipelines import load_config
    from sparsediff.workflows import train

    sets = {"data.path": str(fmnist_dir), "train.progress": False, "train.device": "cpu"}
    sets |= {"autoencoder.dir": "../shared/autoencoder", "data.cache_dir": "../shared/latents"}
    train(load_config("ldm-tiny", sets), tmp_path / "study" / "run")  # as a study stores them
    assert (tmp_path / "study" / "shared" / "autoencoder").is_dir()
    (tmp_path / "study").rename(tmp_path / "moved")
    out = tmp_path / "s.png"
    assert main(["sample", str(tmp_path / "moved" / "run"), "--num", "2", "--out", str(out)]) == 0
    assert out.exists()


@pytest.fixture(scope="module")
def chiro_finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("chiro") / "run"
    assert _train("chirodiff-tiny", run, CHIRO) == 0
    return run


@pytest.mark.parametrize(
    "args, named",
    [
        (["sample", "{run}", "--num", "0"], "--num"),
        (["sample", "{run}", "--num", "-5"], "--num"),
        (["sample", "{run}", "--eta", "nan"], "--eta"),
        (["evaluate", "{run}", "--seed-range", "abc"], "--seed-range"),
        (["evaluate", "{run}", "--seed-range", "5:2"], "--seed-range"),
        (["evaluate", "{run}", "--eta", "nan"], "--eta"),
        (["evaluate", "{run}", "--batch-size", "0"], "--batch-size"),
        (["evaluate", "{run}", "--num-samples", "1"], "--num-samples"),
        (["train", "chirodiff-tiny", "--threads", "0"], "--threads"),
    ],
)
def test_bad_command_line_values_are_one_line_errors(chiro_finished, capsys, args, named):
    args = [a.format(run=chiro_finished) for a in args]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    _bad_input(capsys, exit_.value.code, named)


def test_bad_files_are_named(tmp_path, capsys, chiro_finished, ldm_straight):
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    _bad_input(capsys, _train(str(listed), tmp_path / "r", CHIRO), listed)
    run = tmp_path / "listed-run"
    shutil.copytree(chiro_finished, run)
    (run / "config.json").write_text("[1, 2]")
    _bad_input(capsys, main(["sample", str(run), "--out", str(tmp_path / "a.png")]), "config.json")
    latent = tmp_path / "latent-run"
    shutil.copytree(ldm_straight, latent)
    (latent / "latent.json").write_text('{"shape": [4, 8, 8], "scale": "abc"}')
    code = main(["sample", str(latent), "--out", str(tmp_path / "b.png")])
    _bad_input(capsys, code, latent / "latent.json")
    for name, data in (("latin1.toml", 'name = "caf\xe9"'.encode("latin-1")), ("empty.toml", b"")):
        (tmp_path / name).write_bytes(data)
        _bad_input(capsys, _train(str(tmp_path / name), tmp_path / "r", CHIRO), name)
    study = tmp_path / "study.toml"
    study.write_text('methods = ["dense"\n')
    _bad_input(capsys, main(["study", str(study), "--out", str(tmp_path / "s")]), study)


def test_a_full_disk_is_named(tmp_path, capsys, monkeypatch):
    import sparsediff.io

    def full(state, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(
        sparsediff.io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(9, 9, 0)
    )
    code = _train("chirodiff-tiny", tmp_path / "run", CHIRO)
    _bad_input(capsys, code, "no space left", tmp_path / "run")


def test_a_grid_that_would_not_fit_in_memory_is_refused(
    chiro_finished, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(run_module, "available_memory", lambda: 10_000)
    out = tmp_path / "huge.png"
    code = main(["sample", str(chiro_finished), "--num", "100000000000", "--out", str(out)])
    err = capsys.readouterr().err  # after the first batch's progress bar
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("sparsediff: error: --num 100000000000")
    assert not out.exists()
