"""Exported runs: diffusers LDMPipeline folders that sample like sparsediff, ChiroDiff folders."""

import json
import shutil

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from sparsediff.cli import main
from sparsediff.diffusion.samplers import SamplingSettings
from sparsediff.diffusion.schedules import DDIM_DEFAULTS
from sparsediff.pipelines.base import sample_seeds
from sparsediff.pipelines.chirodiff import load_exported_chirodiff
from sparsediff.weights import load_weights
from sparsediff.workflows.export import export_run
from sparsediff.workflows.run import load_run

# float results compared across two computations: CI runs these under other CPU kernels too
pytestmark = pytest.mark.kernels


def train(preset, run_dir, *sets):
    args = ["train", preset, "--run-dir", str(run_dir)]
    sets = ("train.progress=false", "train.threads=1", *sets)
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return run_dir


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ldm_run(tmp_path_factory, fmnist_dir, one_thread):
    return train("ldm-tiny", tmp_path_factory.mktemp("ldm") / "run", f"data.path={fmnist_dir}")


@pytest.fixture(scope="module")
def ldm_export(ldm_run, tmp_path_factory):
    return export_run(ldm_run, tmp_path_factory.mktemp("export") / "ldm-tiny", compact=True)


def diffusers_images(out_dir, seeds, steps, eta):
    """Float (N, C, H, W) images in [0, 1] from plain diffusers, loaded from the folder alone."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out_dir)
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": steps, "eta": eta, "output_type": "np"}
    if eta == 0:  # one generator per image, as sparsediff draws them
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        images = pipe(len(seeds), generator=generators, **call).images
    else:  # LDMPipeline draws its DDIM noise from the global generator: one image per call
        images = []
        for s in seeds:
            torch.manual_seed(s)
            images += list(pipe(1, **call).images)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)


def sparsediff_samples(run_dir, seeds, steps, eta, one_by_one=False):
    """Images in [-1, 1] from the run, and the pipeline that renders them."""
    pipeline, denoiser = load_run(run_dir)
    settings = SamplingSettings("ddim", steps, eta)
    batches = [[s] for s in seeds] if one_by_one else [seeds]
    return pipeline, torch.cat([pipeline.generate(denoiser, b, settings) for b in batches])


# Both sides run the same network on the same batch shapes, but the DDIM step is two pieces of
# code (diffusers' scheduler, sparsediff's sampler) whose float operations may round
# differently under another CPU's kernels: up to 6.6e-7 measured on an AMD EPYC and under
# ATEN_CPU_CAPABILITY=default (0 on the CI machine's AVX-512). A real fault moves pixels by far
# more: a latent scale wrong by 0.1% already by > 1e-4 (test_a_wrong_export_is_caught).
FLOAT_TOL = 1e-5


def assert_same_pixels(theirs, ours, ours_uint8):
    """``theirs`` in [0, 1] (diffusers), ``ours`` in [-1, 1] and as sparsediff's uint8."""
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours / 2 + 0.5, rtol=0, atol=FLOAT_TOL)
    scaled = theirs.double() * 255
    as_pil = scaled.round().to(torch.uint8)  # what diffusers' numpy_to_pil does
    level = (as_pil.int() - ours_uint8.int()).abs()
    assert level.max() <= 1  # at most one level apart, and only at a rounding boundary
    assert ((scaled.frac() - 0.5).abs()[level > 0] <= FLOAT_TOL * 255).all()


def assert_same_images(run_dir, out_dir, seeds, steps, eta):
    # float kernels round differently per batch size (~1e-6): run the batches diffusers runs
    pipeline, ours = sparsediff_samples(run_dir, seeds, steps, eta, one_by_one=eta > 0)
    theirs = diffusers_images(out_dir, seeds, steps, eta)
    assert_same_pixels(theirs, ours, pipeline.to_images(ours))  # as `sparsediff sample` saves
    return ours


@pytest.mark.parametrize(("seed", "eta"), [(3, 0.0), (5, 1.0)])
def test_ldm_export_samples_the_same_images(ldm_run, ldm_export, seed, eta, one_thread):
    seeds = sample_seeds(seed, 0, 3)  # what `sparsediff sample --seed S --num 3` draws
    ours = assert_same_images(ldm_run, ldm_export, seeds, 4, eta)
    assert ours.shape == (3, 1, 32, 32)
    _, other = sparsediff_samples(ldm_run, sample_seeds(seed + 1, 0, 3), 4, eta)
    assert not torch.equal(ours, other)


def test_a_wrong_export_is_caught(ldm_run, ldm_export, tmp_path, one_thread):
    broken = shutil.copytree(ldm_export, tmp_path / "broken")
    config = broken / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(config.read_text())
    scheduler["steps_offset"] = 0  # every DDIM timestep one step early
    config.write_text(json.dumps(scheduler))
    with pytest.raises(AssertionError):
        assert_same_images(ldm_run, broken, sample_seeds(3, 0, 3), 4, 0.0)


def test_kl_scaled_latents_export_samples_the_same_images(tmp_path, fmnist_dir, one_thread):
    run = train(
        "ldm-tiny",
        tmp_path / "run",
        f"data.path={fmnist_dir}",
        "autoencoder.kind=kl",
        "autoencoder.scale_latents=true",
    )
    assert json.loads((run / "latent.json").read_text())["scale"] != 1.0
    assert_same_images(run, export_run(run, tmp_path / "out"), [0, 1], 3, 0.0)


def test_ldm_export_layout(ldm_run, ldm_export):
    index = json.loads((ldm_export / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    scheduler = json.loads((ldm_export / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler"
    assert {k: scheduler[k] for k in DDIM_DEFAULTS} == DDIM_DEFAULTS
    ema = load_file(str(ldm_run / "model.safetensors"))
    unet = load_file(str(ldm_export / "unet" / "diffusion_pytorch_model.safetensors"))
    compact = load_weights(ldm_export / "model.compact.safetensors")
    assert ema.keys() == unet.keys() == compact.keys()
    assert all(torch.equal(ema[k], unet[k]) and torch.equal(ema[k], compact[k]) for k in ema)
    assert not list(ldm_export.parent.glob(".*.tmp"))  # assembled under a temporary name


def test_model_card_names_method_sparsity_layers_and_eval(ldm_run, ldm_export, tmp_path):
    card = ModelCard.load(ldm_export / "README.md")
    assert card.data.library_name == "diffusers" and "sparse" in card.data.tags
    assert "**rigl**" in card.text and "target sparsity **0.5**" in card.text
    assert "`conv_in.weight`" in card.text  # the per-layer density table
    assert "DiffusionPipeline.from_pretrained" in card.text
    assert "model.compact.safetensors" in card.text
    assert "No evaluation record" in card.text

    run = shutil.copytree(ldm_run, tmp_path / "run")
    record = {
        "metrics": {"fid": 12.345, "kid_mean": 0.01, "kid_std": 0.002, "num_fake": 6},
        "protocol": {"sampler": "ddim", "steps": 4, "eta": 0.0, "seed": 0},
    }
    (run / "eval-ddim4-eta0-n6-seed0-ema.json").write_text(json.dumps(record))
    text = ModelCard.load(export_run(run, tmp_path / "out") / "README.md").text
    assert "FID **12.345**" in text and "eval-ddim4-eta0-n6-seed0-ema.json" in text


def test_export_refusals(ldm_run, ldm_export, tmp_path):
    with pytest.raises(FileExistsError):
        export_run(ldm_run, ldm_export)
    with pytest.raises(ValueError, match="compact=True"):
        export_run(ldm_run, tmp_path / "out", value_dtype="fp16")
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        export_run(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_chirodiff_export_rebuilds_from_the_folder_alone(tmp_path, one_thread):
    run = train("chirodiff-tiny", tmp_path / "run", "data.max_train=24")
    out = export_run(run, tmp_path / "export", compact=True, value_dtype="fp16")
    pipeline, ours = load_run(run)
    lengths = json.loads((run / "lengths.json").read_text())
    shutil.rmtree(run)  # the folder must be enough

    denoiser, info = load_exported_chirodiff(out)
    ema, state = ours.state_dict(), denoiser.state_dict()
    assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in ema)
    assert info["lengths"].tolist() == lengths and info["sampling"].variance_scale == 0.75
    a = pipeline.generate(ours, [1, 2, 3], pipeline.sampling(pipeline.cfg.sample))
    b = info["pipeline"].generate(denoiser, [1, 2, 3], info["sampling"])
    assert [len(s) for s in a] == [len(s) for s in b]
    assert all(np.array_equal(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb))
    card = ModelCard.load(out / "README.md")
    assert "ChiroDiff" in card.text and "**rigl**" in card.text and "float16" in card.text
