"""End-to-end runs of both pipelines through the CLI, on tiny presets."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from sparsediff.cli import main
from sparsediff.workflows import evaluate, noise_floors
from sparsediff.workflows.evaluation import PartialEvaluation


class TinyFeatures(nn.Module):
    """A fixed random conv feature network (stands in for Inception in tests)."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, images):
        x = images.float() / 127.5 - 1
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.conv(x).mean(dim=(2, 3))


def train(preset, run_dir, *sets, resume=False):
    args = ["train", preset, "--run-dir", str(run_dir)]
    for s in sets:
        args += ["--set", s]
    if resume:
        args.append("--resume")
    assert main(args) == 0


def weights(run_dir):
    return load_file(str(Path(run_dir) / "model.safetensors"))


@pytest.fixture()
def ldm_sets(fmnist_dir):
    return [f"data.path={fmnist_dir}", "train.progress=false"]


@pytest.mark.kernels  # batch sizes: other float kernels
def test_ldm_tiny_end_to_end(tmp_path, ldm_sets):
    run = tmp_path / "run"
    train("ldm-tiny", run, *ldm_sets)
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "model.safetensors", "done.json"):
        assert (run / name).exists(), name
    assert (run / "autoencoder" / "config.json").exists()
    assert Image.open(run / "samples.png").size[0] > 16
    # the exported weights are exactly as sparse as the engine says, and load into the plain class
    done = json.loads((run / "done.json").read_text())
    sparse = done["sparse"]
    w = weights(run)
    assert sparse["layer_density"]
    for name, density in sparse["layer_density"].items():
        assert int((w[name] != 0).sum()) == round(density * w[name].numel()), name
    assert (
        main(["sample", str(run), "--num", "4", "--steps", "3", "--out", str(tmp_path / "g.png")])
        == 0
    )
    assert (tmp_path / "g.png").exists()
    record = evaluate(run, feature_module=TinyFeatures(), cache_dir=tmp_path / "cache")
    m, c = record.metrics, record.cost
    assert m["num_fake"] == 6 and m["fid"] >= 0
    assert c.params_nonzero < c.params_total
    assert c.inference_flops < c.inference_flops_dense
    assert c.sample_flops == pytest.approx(4 * c.inference_flops + c.decode_flops)
    assert c.train_flops < c.train_flops_dense
    assert list(run.glob("eval-ddim4-eta0-n6-seed0-ema.json"))
    assert record.protocol["reference"]["split"] == "test"
    # a split evaluation (seed ranges) gives exactly the samples of an unsplit one
    partial = evaluate(
        run, seed=1, seed_range=(0, 4), feature_module=TinyFeatures(), cache_dir=tmp_path / "cache"
    )
    assert isinstance(partial, PartialEvaluation) and partial.shards == [(0, 4)]
    split = evaluate(
        run, seed=1, seed_range=(4, 6), feature_module=TinyFeatures(), cache_dir=tmp_path / "cache"
    )
    other = tmp_path / "copy"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("eval"))
    whole = evaluate(other, seed=1, feature_module=TinyFeatures(), cache_dir=tmp_path / "cache")
    assert split.metrics == whole.metrics
    # the batch size changes only speed (and float rounding): one sample at a time, same samples
    third = tmp_path / "third"
    shutil.copytree(run, third, ignore=shutil.ignore_patterns("eval"))
    evaluate(third, seed=1, batch_size=1, feature_module=TinyFeatures(), cache_dir=tmp_path / "c")
    ones, batched = (
        load_file(str(next(d.glob("eval/*/*.safetensors"))))["images"] for d in (third, other)
    )
    # other batch shapes, other float kernels: a pixel may land one level away, at a rounding
    # boundary; samples drawn from other seeds would differ by far more
    level = (ones.int() - batched.int()).abs()
    assert level.max() <= 1 and (level > 0).float().mean() < 0.01
    # seed ranges need not align with batches, and may overlap
    evaluate(
        run, seed=2, seed_range=(1, 3), feature_module=TinyFeatures(), cache_dir=tmp_path / "c"
    )
    done = evaluate(
        run, seed=2, seed_range=(0, 6), feature_module=TinyFeatures(), cache_dir=tmp_path / "c"
    )
    assert done.metrics["num_fake"] == 6


def test_ldm_resume_through_cli_is_exact(tmp_path, ldm_sets):
    train("ldm-tiny", tmp_path / "straight", *ldm_sets)
    train("ldm-tiny", tmp_path / "split", *ldm_sets, "train.stop_at=4")
    assert not (tmp_path / "split" / "done.json").exists()
    train("ldm-tiny", tmp_path / "split", *ldm_sets, resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "split")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


CHIRO = ["train.progress=false", "data.max_train=24"]


def test_chirodiff_tiny_end_to_end_and_resume(tmp_path):
    train("chirodiff-tiny", tmp_path / "straight", *CHIRO)
    run = tmp_path / "straight"
    assert (run / "samples.png").exists() and len(list((run / "samples-svg").glob("*.svg"))) == 4
    svg = next((run / "samples-svg").glob("*.svg")).read_text()
    assert svg.lstrip().startswith("<svg") or "<svg" in svg
    train("chirodiff-tiny", tmp_path / "split", *CHIRO, "train.stop_at=3")
    train("chirodiff-tiny", tmp_path / "split", *CHIRO, resume=True)
    a, b = weights(run), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--num", "3", "--sampler", "ddpm", "--out", str(out)]) == 0
    assert len(list((tmp_path / "s-svg").glob("*.svg"))) == 3


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, run_dir, fmnist):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    sets = [
        "--set",
        f"data.path={fmnist}",
        "--set",
        "train.progress=false",
        "--set",
        "train.device=cpu",
    ]
    assert main(["train", "ldm-tiny", "--run-dir", run_dir, *sets]) == 0


def test_two_process_ddp_keeps_masks_identical(tmp_path, fmnist_dir):
    # Each rank checks its masks against the others at the end (verify_consistent raises on a
    # mismatch, which would make the worker, and so this test, fail).
    run = tmp_path / "ddp"
    torch.multiprocessing.spawn(
        _ddp_worker, args=(_free_port(), str(run), str(fmnist_dir)), nprocs=2, join=True
    )
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["environment"]["world_size"] == 2
    assert (run / "done.json").exists()


def test_autoencoder_fingerprint_is_computed_once_per_run(tmp_path, ldm_sets, monkeypatch):
    import sparsediff.data.latents as latents_module
    import sparsediff.pipelines.ldm as ldm_module
    from sparsediff.models.autoencoder import autoencoder_fingerprint

    calls = []

    def counting(ae):
        calls.append(1)
        return autoencoder_fingerprint(ae)

    monkeypatch.setattr(ldm_module, "autoencoder_fingerprint", counting)
    monkeypatch.setattr(latents_module, "autoencoder_fingerprint", counting, raising=False)
    train("ldm-tiny", tmp_path / "run", *ldm_sets)
    assert len(calls) == 1


def test_a_crash_while_writing_a_shard_leaves_no_shard(tmp_path, ldm_sets, monkeypatch):
    import sparsediff.workflows.evaluation as evaluation

    run = tmp_path / "run"
    train("ldm-tiny", run, *ldm_sets)

    def crash(tensors, path):
        Path(path).write_bytes(b"half a shard")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(evaluation, "save_file", crash)
        with pytest.raises(KeyboardInterrupt):
            evaluate(run, feature_module=TinyFeatures(), cache_dir=tmp_path / "cache")
    assert not list((run / "eval").rglob("samples-*.safetensors"))
    record = evaluate(run, feature_module=TinyFeatures(), cache_dir=tmp_path / "cache")
    assert record.metrics["num_fake"] == 6


def test_evaluation_shows_sampling_progress(tmp_path, ldm_sets, capsys):
    run = tmp_path / "run"
    train("ldm-tiny", run, *ldm_sets)
    capsys.readouterr()
    evaluate(run, feature_module=TinyFeatures(), cache_dir=tmp_path / "cache")
    assert "sampling" in capsys.readouterr().err


@pytest.mark.parametrize("tie", ["false", "true"])
@pytest.mark.kernels  # the condensed network against the masked one
def test_condensed_channel_run_samples_and_evaluates_like_the_run(tmp_path, ldm_sets, tie):
    import numpy as np

    from sparsediff.io import read_json

    run, small = tmp_path / "run", tmp_path / "small"
    sets = ["sparse.granularity=channel", "sparse.method=static", f"sparse.tie_stream={tie}"]
    train("ldm-tiny", run, *ldm_sets, *sets)
    assert main(["condense", str(run), "--out", str(small)]) == 0
    plan = read_json(small / "condensed.json")["plan"]
    # tied: the residual stream itself is narrower (its readers get only the live channels)
    narrowed = any(entry.get("inputs") is not None for entry in plan.values())
    assert narrowed or tie == "false"
    for d in (run, small):
        out = tmp_path / f"{d.name}.png"
        assert main(["sample", str(d), "--num", "3", "--steps", "3", "--out", str(out)]) == 0
    a, b = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("run", "small"))
    assert np.abs(a - b).max() <= 1  # same samples up to float rounding
    full = evaluate(run, feature_module=TinyFeatures(), cache_dir=tmp_path / "cache").cost
    cut = evaluate(small, feature_module=TinyFeatures(), cache_dir=tmp_path / "cache").cost
    assert cut.params_total < full.params_total == cut.params_dense_total
    assert cut.inference_flops < cut.inference_flops_dense == full.inference_flops_dense
    assert cut.train_flops == pytest.approx(full.train_flops)


def test_noise_floors_and_scores_against_reconstructions(tmp_path, ldm_sets):
    run = tmp_path / "run"
    train("ldm-tiny", run, *ldm_sets)
    cache = tmp_path / "cache"
    floors = noise_floors(run, feature_module=TinyFeatures(), cache_dir=cache)
    proto = floors["protocol"]
    # the second real set: the 8 test images after the reference's 8, disjoint from them
    assert proto["reference"]["size"] == proto["second_set"]["size"] == 8
    assert proto["second_set"]["offset"] == "8" and "offset" not in proto["reference"]
    real, recon = floors["floors"]["real_vs_real"], floors["floors"]["autoencoder"]
    assert real["num_real"] == real["num_fake"] == 8
    assert real["fid"] > 0 and recon["fid"] > 0  # different images: neither is zero
    assert recon["fid"] != real["fid"]
    assert json.loads((run / "floors.json").read_text())["floors"] == floors["floors"]

    # scored against the reconstructions of the reference images too: a different number
    record = evaluate(run, feature_module=TinyFeatures(), cache_dir=cache)
    vs_recon = record.metrics_vs_reconstructions
    assert vs_recon["num_real"] == 8 and vs_recon["fid"] != record.metrics["fid"]
    # the reconstructions' features are cached under their own key, beside the images'
    assert len(list(cache.rglob("*.safetensors"))) == 4  # ref, 2nd set, and each reconstructed

    # Fashion-MNIST's "valid" is its test split: the same images are no second set
    with pytest.raises(ValueError, match="reference images themselves"):
        noise_floors(run, feature_module=TinyFeatures(), cache_dir=cache, floor_split="valid")

    # a second set that cannot match the reference's size is not measured, and says why:
    # never silently smaller
    train("ldm-tiny", tmp_path / "big", *ldm_sets, "eval.reference_size=16")
    floors = noise_floors(tmp_path / "big", feature_module=TinyFeatures(), cache_dir=cache)
    assert floors["floors"] == {}
    assert "has 0 items, fewer than the reference's 16" in floors["warnings"][0]


def test_chirodiff_floors_have_no_first_stage(tmp_path):
    run = tmp_path / "run"
    sets = ["data.split_fractions=[0.5, 0.25, 0.25]", "eval.floor_split=valid"]
    train("chirodiff-tiny", run, *CHIRO, *sets)
    floors = noise_floors(
        run, feature_module=TinyFeatures(), cache_dir=tmp_path / "c", progress=False
    )
    assert set(floors["floors"]) == {"real_vs_real"}
    assert floors["protocol"]["second_set"]["split"] == "valid"
    assert "offset" not in floors["protocol"]["second_set"]  # another split: from its start
    assert "split_fractions" in floors["protocol"]["reference"]
    record = evaluate(run, feature_module=TinyFeatures(), cache_dir=tmp_path / "c")
    assert record.metrics_vs_reconstructions is None


def test_evaluation_warns_of_fewer_references_than_asked_or_than_samples(tmp_path, ldm_sets):
    run = tmp_path / "run"
    train("ldm-tiny", run, *ldm_sets, "eval.reference_size=100000")
    record = evaluate(run, 20, feature_module=TinyFeatures(), cache_dir=tmp_path / "c")
    assert record.metrics["num_real"] == 16  # all the split holds, and it says so
    first, second = record.warnings
    assert "eval.reference_size = 100000, but the test split has only 16" in first
    assert "20 samples against 16 references" in second
    assert json.loads(Path(record.record).read_text())["warnings"] == record.warnings


def test_a_study_on_a_split_too_small_for_floors_says_so_and_finishes(tmp_path):
    from sparsediff.study.results import read_results
    from sparsediff.study.sweep import run_study

    study = tmp_path / "tiny.toml"
    study.write_text(
        'methods = ["dense"]\n[[datasets]]\nname = "kanji"\npreset = "chirodiff-tiny"\n'
        '[datasets.overrides]\n"train.progress" = false\n'
    )
    kw = {"feature_module": TinyFeatures(), "cache_dir": tmp_path / "c", "progress": False}
    run_study(
        study,
        tmp_path / "out",
        evaluate_fn=lambda run, n, seed: evaluate(run, n, seed=seed, **kw).to_dict(),
        floors_fn=lambda run: noise_floors(run, **kw),
        progress=False,
    )
    floors = {r["id"]: r for r in read_results(tmp_path / "out" / "results.jsonl")}["kanji/floors"]
    assert floors["floors"] == {} and "noise floors not measured" in floors["warnings"][0]
