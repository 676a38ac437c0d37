"""A third pipeline is one class plus one registry entry: a toy one, registered by the test."""

import json

import pytest
import torch
from torch import nn

from sparsediff.cli import main
from sparsediff.diffusion.losses import epsilon_mse
from sparsediff.imaging import to_uint8
from sparsediff.pipelines import PIPELINES, Pipeline, get_pipeline
from sparsediff.training.loop import Task
from sparsediff.workflows import evaluate


class ToyNet(nn.Module):
    """A tiny ε-predictor over 1x8x8 images."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.time = nn.Linear(1, 8)
        self.out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        h = self.conv(x) + self.time(t.float()[:, None] / 1000)[:, :, None, None]
        return self.out(torch.relu(h))


def toy_images(n):
    images = -torch.ones(n, 1, 8, 8)
    for i in range(n):
        images[i, :, i % 6 : i % 6 + 3, 2:5] = 1.0
    return images


class Squares(Pipeline):
    """Squares on 8x8 images: everything a pipeline must say, and nothing else."""

    name = "squares"

    def prepare(self, dist, resume):
        self.data = toy_images(32)

    def task(self):
        scheduler = self.scheduler()

        def loss(model, x, gen):
            return epsilon_mse(model, x, scheduler, generator=gen)

        return Task(self.build_denoiser(), self.data, loss)

    def load(self, device):
        pass

    def build_denoiser(self):
        return ToyNet()

    def generate(self, denoiser, seeds, settings, progress=False):
        device = next(denoiser.parameters()).device
        shape = (len(seeds), 1, 8, 8)
        return self.run_chain(denoiser, shape, device, seeds, settings, progress).clamp(-1, 1)

    def to_images(self, samples):
        return to_uint8(samples).cpu()

    def reference(self, split, size, offset=0):
        return to_uint8(toy_images(size)), {"dataset": "squares"}

    def flop_inputs(self, device):
        return torch.zeros(1, 1, 8, 8, device=device), torch.zeros(1, dtype=torch.long)


class MeanFeatures(nn.Module):
    num_features = 4

    def forward(self, images):
        x = images.float() / 255
        return torch.stack(
            [
                x.mean((1, 2, 3)),
                x.std((1, 2, 3)),
                x[..., :4].mean((1, 2, 3)),
                x[..., 4:, :].mean((1, 2, 3)),
            ],
            1,
        )


@pytest.fixture()
def squares(monkeypatch):
    monkeypatch.setitem(PIPELINES, Squares.name, Squares)
    return Squares


def test_unknown_pipeline_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="registered: ldm, chirodiff, dit"):
        get_pipeline("mmdit")
    code = main(["train", "ldm-tiny", "--run-dir", str(tmp_path), "--set", "pipeline=mmdit"])
    assert code == 2 and "pipeline = 'mmdit'" in capsys.readouterr().err


SQUARES_PRESET = """
pipeline = "squares"  # the shared sections only: Squares declares no data or model section
[sparse]
method = "rigl"
sparsity = 0.5
update_interval = 2
[train]
steps = 6
batch_size = 8
lr = 1e-3
progress = false
device = "cpu"
[sample]
steps = 4
num = 4
[eval]
num_samples = 6
batch_size = 4
steps = 4
reference_size = 8
"""


def test_toy_pipeline_trains_samples_and_evaluates(tmp_path, squares, single_thread):
    run = tmp_path / "run"
    preset = tmp_path / "squares.toml"
    preset.write_text(SQUARES_PRESET)
    assert main(["train", str(preset), "--run-dir", str(run)]) == 0
    done = json.loads((run / "done.json").read_text())
    assert done["step"] == 6 and done["sparse"]["density"] == pytest.approx(0.5, abs=0.02)
    assert (run / "samples.png").exists() and (run / "model.safetensors").exists()
    assert main(["sample", str(run), "--num", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists()
    record = evaluate(
        run, feature_module=MeanFeatures(), cache_dir=tmp_path / "cache", device="cpu"
    )
    assert record.metrics["num_fake"] == 6
    assert record.cost.inference_flops < record.cost.inference_flops_dense
    assert record.protocol["reference"]["dataset"] == "squares"
