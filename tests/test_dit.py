"""The class-conditional latent DiT: a pipeline added as one module, trained sparse, sampled with
guidance, exported to plain diffusers, and condensed (heads and MLP neurons) exactly."""

import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from test_pipelines import TinyFeatures

from sparsediff.cli import main
from sparsediff.models import condense as cd
from sparsediff.models.dit import (
    CHANNEL_EXCLUDE,
    attention_groups,
    build_dit,
    drop_labels,
    guided_eps,
)
from sparsediff.pipelines import load_config
from sparsediff.sparsity import SparseTraining
from sparsediff.workflows.export import export_run
from sparsediff.workflows.run import load_run


def _train(run_dir, *sets):
    args = ["train", "dit-tiny", "--run-dir", str(run_dir), "--threads", "1"]
    for s in ("train.progress=false", "train.device=cpu", *sets):
        args += ["--set", s]
    assert main(args) == 0
    return run_dir


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory, fmnist_dir):
    return _train(tmp_path_factory.mktemp("dit") / "run", f"data.path={fmnist_dir}")


def test_the_dit_is_one_registered_pipeline_with_its_own_sections():
    cfg = load_config("dit-tiny")
    assert cfg.pipeline == "dit" and cfg.model.num_classes == 10
    assert cfg.sample.guidance_scale == 2.0 and "autoencoder" in cfg.to_dict()
    with pytest.raises(ValueError, match="model.preset"):
        load_config("dit-tiny", {"model.preset": "XL/2"})


def test_dit_trains_sparse_samples_and_evaluates(dit_run, tmp_path, single_thread):
    done = json.loads((dit_run / "done.json").read_text())
    assert done["step"] == 6 and done["sparse"]["density"] == pytest.approx(0.5, abs=0.02)
    out = tmp_path / "grid.png"
    assert main(["sample", str(dit_run), "--num", "10", "--out", str(out)]) == 0
    from sparsediff.workflows import evaluate

    record = evaluate(dit_run, feature_module=TinyFeatures(), cache_dir=tmp_path / "c")
    assert record.metrics["num_fake"] == 6 and record.protocol["guidance_scale"] == 2.0
    assert record.cost.nfe == 2 * 4  # guided: the null class is evaluated too
    assert record.metrics_vs_reconstructions is not None  # LDM's first stage, LDM's protocol


def test_labels_are_dropped_reproducibly_and_the_latent_cache_keeps_them(dit_run):
    pipeline, _ = load_run(dit_run)
    assert pipeline.labels_of([3, 14, 25], torch.device("cpu")).tolist() == [3, 4, 5]
    from sparsediff.data.latents import LatentCache

    cache = next((dit_run / "latents").glob("*.safetensors"))
    labels = LatentCache.load(cache).labels
    assert labels is not None and labels.tolist()[:4] == [0, 1, 2, 3]  # the fixture's labels
    y = torch.arange(10)
    a = drop_labels(y, 0.5, 10, torch.Generator().manual_seed(1))
    b = drop_labels(y, 0.5, 10, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and (a == 10).any() and (a != 10).any()


def test_guidance_is_ditpipelines_formula():
    torch.manual_seed(0)
    model = build_dit("tiny", 8, 3, 10).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 7])
    with torch.no_grad():
        cond = model(x, timestep=t, class_labels=y).sample
        uncond = model(x, timestep=t, class_labels=torch.tensor([10, 10])).sample
        got = guided_eps(model, x, t, y, 3.0)
        alone = guided_eps(model, x, t, y, 1.0)
    # one batch of both halves: other batch shapes, other float kernels than two calls
    torch.testing.assert_close(got, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert torch.equal(alone, cond)


def test_export_samples_with_plain_diffusers_and_the_card_loop(
    dit_run, tmp_path, single_thread, monkeypatch
):
    out = export_run(dit_run, tmp_path / "export")
    from dataclasses import replace

    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    pipeline, denoiser = load_run(dit_run)
    seeds = [0, 1, 2]
    labels = [s % 10 for s in seeds]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    call = {"num_inference_steps": 4, "generator": gens, "output_type": "np"}
    theirs = pipe(labels, guidance_scale=1.0, **call).images
    settings = pipeline.sampling(pipeline.cfg.sample, steps=4, eta=0.0)
    ours = pipeline.generate(denoiser, seeds, replace(settings, guidance_scale=1.0))
    # two implementations of one DDIM chain: float rounding only (see test_export.FLOAT_TOL)
    theirs = torch.from_numpy(np.stack(theirs)).permute(0, 3, 1, 2)
    torch.testing.assert_close(theirs, ours / 2 + 0.5, rtol=0, atol=1e-5)
    # the card's guided loop gives the guided samples
    card = ModelCard.load(out / "README.md").text
    start = card.index("```python") + len("```python")
    scope = {}
    monkeypatch.chdir(out.parent)  # the card names the folder as exported
    exec(card[start : card.index("```", start)], scope)
    guided = pipeline.generate(denoiser, scope["seeds"], replace(settings, guidance_scale=2.0))
    torch.testing.assert_close(scope["images"], guided / 2 + 0.5, rtol=0, atol=1e-5)


def _channel_sparse_dit(dtype=torch.float64):
    torch.manual_seed(0)
    model = build_dit("tiny", 8, 3, 10, num_layers=2).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = SparseTraining(
        model,
        opt,
        method="static",
        sparsity=0.5,
        granularity="channel",
        distribution="uniform",
        include=None,
        exclude=list(CHANNEL_EXCLUDE),
        total_steps=10,
        tied=attention_groups(model),
    )
    sparse.remove()
    with torch.no_grad():  # biases of every size: a dead channel still outputs its bias
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p))
    return model.eval()


def test_condensed_dit_equals_the_masked_one_in_float64():
    model = _channel_sparse_dit()
    condensed, plan = cd.condense(model)
    kinds = {entry["kind"] for entry in plan.values()}
    assert {"attention", "feedforward"} <= kinds
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([1, 500, 999]), torch.tensor([0, 4, 10])
    with torch.no_grad():
        want = model(x, timestep=t, class_labels=y).sample
        got = condensed.eval()(x, timestep=t, class_labels=y).sample
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    params = sum(p.numel() for p in condensed.parameters())
    assert params < sum(p.numel() for p in model.parameters())


def test_a_wrong_fold_is_caught():
    model = _channel_sparse_dit()
    condensed, plan = cd.condense(model)
    name = next(n for n, e in plan.items() if e["kind"] == "feedforward")
    with torch.no_grad():  # forget the dead neurons' constant: what a wrong fold computes
        layer = condensed.get_submodule(name).out
        layer.bias.copy_(model.get_submodule(name).net[2].bias)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    t, y = torch.tensor([3, 7]), torch.tensor([1, 2])
    with torch.no_grad():
        gap = (
            condensed(x, timestep=t, class_labels=y).sample
            - model(x, timestep=t, class_labels=y).sample
        )
    assert gap.abs().max() > 1e-6
