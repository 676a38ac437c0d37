import json
import tomllib

import pytest

from sparsediff.config import CONFIG_DIR, parse_override, validate
from sparsediff.diffusion.schedules import DEFAULT_BETA_RANGE
from sparsediff.pipelines import load_config, read_run_config
from sparsediff.sparsity import SparseSettings


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_preset_loads(path):
    cfg = load_config(path.stem)
    assert cfg.name == path.stem
    assert cfg.pipeline in ("ldm", "chirodiff", "dit")


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
    with pytest.raises(ValueError, match="sparse.stop_fraction"):
        load_config("ldm-tiny", {"sparse.stop_fraction": 1.5})
    with pytest.raises(ValueError, match="sparse.erk_power_scale"):
        load_config("ldm-tiny", {"sparse.erk_power_scale": -1.0})
    with pytest.raises(ValueError, match="diffusion.schedule"):
        load_config("ldm-tiny", {"diffusion.schedule": "sigmoid"})
    with pytest.raises(ValueError, match="sample.sampler"):
        load_config("ldm-tiny", {"sample.sampler": "euler"})
    with pytest.raises(ValueError, match="diffusion.beta_start"):
        load_config("ldm-tiny", {"diffusion.beta_start": 0.05})  # above the default end


def test_a_pipeline_that_is_not_registered_is_named():
    with pytest.raises(ValueError, match="pipeline = 'not-registered-here'; registered: ldm"):
        load_config({"pipeline": "not-registered-here"})


def test_each_pipeline_owns_its_sections():
    chiro, ldm = load_config("chirodiff-tiny"), load_config("ldm-tiny")
    assert "autoencoder" not in chiro.to_dict() and "autoencoder" in ldm.to_dict()
    assert "pen_threshold" in chiro.to_dict()["sample"] and "resolution" in ldm.to_dict()["data"]
    with pytest.raises(ValueError, match="unknown config key 'autoencoder.steps'"):
        load_config("chirodiff-tiny", {"autoencoder.steps": 3})
    with pytest.raises(ValueError, match="unknown config key 'data.resolution'"):
        load_config("chirodiff-tiny", {"data.resolution": 3})


def test_a_record_of_an_older_version_still_loads(tmp_path):
    # one schema used to serve every pipeline: a ChiroDiff record holds LDM's sections too
    cfg = load_config("chirodiff-tiny")
    record = cfg.to_dict()
    record["autoencoder"] = {"kind": "vq", "steps": 400}
    record["data"] |= {"resolution": 32, "cache_dir": ""}
    (tmp_path / "config.json").write_text(json.dumps({"config": record}))
    assert read_run_config(tmp_path) == cfg


def test_omitted_beta_range_is_the_schedules_default():
    # ChiroDiff's linear schedule gets its own default, not LDM's (0.0015, 0.0195)
    chiro = load_config({"pipeline": "chirodiff", "diffusion": {"schedule": "linear"}})
    assert (chiro.diffusion.beta_start, chiro.diffusion.beta_end) == (1e-4, 2e-2)
    ldm = load_config({})
    assert (ldm.diffusion.beta_start, ldm.diffusion.beta_end) == (0.0015, 0.0195)
    # one end set, the other from the schedule; the resolved numbers are in to_dict()
    half = load_config({"diffusion": {"schedule": "linear", "beta_end": 0.03}}).to_dict()
    assert (half["diffusion"]["beta_start"], half["diffusion"]["beta_end"]) == (1e-4, 0.03)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_presets_resolve_the_beta_range_they_name(path):
    table = tomllib.loads(path.read_text()).get("diffusion", {})
    cfg = load_config(path.stem).diffusion
    default = DEFAULT_BETA_RANGE[cfg.schedule]
    assert cfg.beta_start == table.get("beta_start", default[0])
    assert cfg.beta_end == table.get("beta_end", default[1])
    if "beta_start" not in table:  # before per-schedule defaults, every preset got LDM's
        assert cfg.schedule == "ldm" and (cfg.beta_start, cfg.beta_end) == (0.0015, 0.0195)


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
    validate(cfg)  # a resolved config stays valid


def test_split_fractions_and_unet_channels_are_checked():
    cfg = load_config("chirodiff-tiny", {"data.split_fractions": [0.6, 0.2, 0.2]})
    assert cfg.data.split_fractions == [0.6, 0.2, 0.2]
    with pytest.raises(ValueError, match="data.split_fractions"):
        load_config("chirodiff-tiny", {"data.split_fractions": [0.5, 0.5]})
    with pytest.raises(ValueError, match="model.channels"):
        load_config("ldm-tiny", {"model.channels": [0, 8]})


def test_tie_stream_needs_channels_and_a_stream():
    from sparsediff.training.loop import Task, _tied

    sets = {"sparse.method": "rigl", "sparse.sparsity": 0.5, "sparse.tie_stream": True}
    with pytest.raises(ValueError, match="needs sparse.granularity = 'channel'"):
        load_config("ldm-tiny", sets)
    cfg = load_config("ldm-tiny", {**sets, "sparse.granularity": "channel"})
    assert cfg.sparse.tie_stream
    streamless = Task(model=None, dataset=None, loss=None)  # e.g. ChiroDiff's GRU denoiser
    with pytest.raises(ValueError, match="no residual stream to tie"):
        _tied(streamless, cfg.sparse)
    assert _tied(streamless, SparseSettings()) == []
    groups = [["a.weight", "b.weight"]]
    assert _tied(Task(None, None, None, stream_groups=groups), cfg.sparse) == groups


def test_a_dense_run_records_no_sparsity():
    # one set of engine rules: dense ignores sparsity, and the run's config says what ran
    cfg = load_config("ldm-tiny", {"sparse.method": "dense"})
    assert cfg.sparse.method == "dense" and cfg.sparse.sparsity == 0.0
    assert load_config("ldm-tiny").sparse.sparsity == 0.5  # the preset's RigL keeps its own
