import json

import pytest

from sparsediff.config import CONFIG_DIR, load_config, parse_override, read_run_config


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_preset_loads(path):
    cfg = load_config(path.stem)
    assert cfg.name == path.stem
    assert cfg.pipeline in ("ldm", "chirodiff")


def test_overrides_are_typed_and_checked():
    cfg = load_config("ldm-tiny", ["sparse.sparsity=0.75", "train.steps=9", "sparse.exclude=a,b"])
    assert cfg.sparse.sparsity == 0.75 and cfg.train.steps == 9
    assert cfg.sparse.exclude == ["a", "b"]
    assert load_config("ldm-tiny", {"train.lr": 1}).train.lr == 1.0  # int widens to float
    with pytest.raises(ValueError, match="unknown config key"):
        load_config("ldm-tiny", {"sparse.sparsty": 0.5})
    with pytest.raises(ValueError, match="must be int"):
        load_config("ldm-tiny", {"train.steps": "ten"})
    with pytest.raises(ValueError, match="train.precision"):
        load_config("ldm-tiny", {"train.precision": "fp8"})
    with pytest.raises(ValueError, match="unknown config"):
        load_config("no-such-preset")
    # sparse settings fail when the config is built, not after stage 1 has trained
    with pytest.raises(ValueError, match="sparse.method"):
        load_config("ldm-tiny", {"sparse.method": "lottery"})
    with pytest.raises(ValueError, match="sparse.sparsity"):
        load_config("ldm-tiny", {"sparse.sparsity": 1.0})
    with pytest.raises(ValueError, match="sparse.prune_ratio"):
        load_config("ldm-tiny", {"sparse.prune_ratio": 0.0})
    with pytest.raises(ValueError, match="sparse.update_interval"):
        load_config("ldm-tiny", {"sparse.update_interval": 0})


def test_parse_override_reads_toml_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("data.path=/x/y") == ("data.path", "/x/y")
    with pytest.raises(ValueError):
        parse_override("novalue")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("chirodiff-tiny", {"seed": 3})
    (tmp_path / "config.json").write_text(json.dumps({"config": cfg.to_dict()}))
    assert read_run_config(tmp_path) == cfg
