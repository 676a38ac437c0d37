import pytest

from sparsediff.cli import build_parser, main


@pytest.mark.parametrize("command", ["train", "sample", "evaluate", "study", "report"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sparsediff " + command in out


def test_train_help_lists_presets(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "ldm-fashion-mnist" in capsys.readouterr().out


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
