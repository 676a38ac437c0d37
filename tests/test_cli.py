import json

import pytest

from sparsediff.cli import build_parser, main


@pytest.mark.parametrize("command", ["train", "sample", "evaluate", "study", "report"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sparsediff " + command in out


def test_presets_lists_presets_and_studies(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "ldm-fashion-mnist" in out and "chirodiff-kanjivg" in out and "quick" in out


def test_version_and_print_config(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip()
    assert main(["train", "ldm-tiny", "--steps", "7", "--seed", "3", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["steps"] == 7 and cfg["seed"] == 3


def test_train_starts_from_a_runs_config_json(tmp_path, capsys):
    sets = ["--set", "train.progress=false", "--set", "data.max_train=24", "--threads", "1"]
    run = tmp_path / "run"
    assert main(["train", "chirodiff-tiny", "--run-dir", str(run), "--steps", "2", *sets]) == 0
    out = capsys.readouterr().out
    assert f"in {run}" in out and "finished at step 2" in out  # banner and summary
    again = tmp_path / "again"
    assert main(["train", str(run / "config.json"), "--run-dir", str(again), *sets]) == 0
    a, b = (json.loads((d / "config.json").read_text())["config"] for d in (run, again))
    assert a == b


def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "train",
            "ldm-celebahq",
            "--run-dir",
            str(tmp_path / "r"),
            "--set",
            f"data.path={tmp_path / 'nowhere'}",
            "--set",
            "train.device=cpu",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "celebahq" in err.lower() and "data.path" in err


def test_bad_override_is_a_clear_error(capsys):
    code = main(["train", "ldm-tiny", "--set", "no.such=1"])
    assert code == 2
    assert "unknown config key" in capsys.readouterr().err
