"""A class-conditional latent DiT with a sparse transformer, on Latent Diffusion's first stage.

The first stage, the latent cache (which keeps each image's class label) and the evaluation
are Latent Diffusion's; the denoiser is a DiT (diffusers ``DiTTransformer2DModel``) conditioned
on the class, trained with labels dropped to the null class (classifier-free guidance) and
sampled with guidance. Sample ``i`` of a seed draws class ``seed_i mod num_classes``, so grids
and evaluations are balanced over the classes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from sparsediff.data.images import FASHION_MNIST_CLASSES
from sparsediff.diffusion.losses import epsilon_mse
from sparsediff.diffusion.samplers import SampleConfig, SamplingSettings, build_sampling_scheduler
from sparsediff.imaging import save_image_grid
from sparsediff.models.autoencoder import autoencoder_kind
from sparsediff.models.dit import (
    DIT_PRESETS,
    attention_groups,
    build_dit,
    dit_eps,
    drop_labels,
    guided_eps,
)
from sparsediff.pipelines.base import EvalConfig, FamilyConfig, sample_seeds
from sparsediff.pipelines.ldm import AutoencoderConfig, ImageData, LatentDiffusion
from sparsediff.sections import FRACTION, Section, at_least
from sparsediff.training.loop import Task

CLASS_NAMES = {"fashion-mnist": FASHION_MNIST_CLASSES}  # the model card's label table


@dataclass
class DitModel(Section):
    """A DiT run's ``model`` section."""

    _RULES: ClassVar[dict[str, Any]] = {
        "preset": tuple(DIT_PRESETS),
        "num_classes": at_least(1),
        "class_dropout": FRACTION,
    }

    preset: str = "fmnist"  # models.dit.DIT_PRESETS: fmnist, tiny, S/2, B/2
    num_classes: int = 10  # labels 0..n-1 of the data; n is the null class
    class_dropout: float = 0.1  # labels dropped to the null class in training (guidance)


@dataclass
class GuidedSample(SampleConfig):
    """Sample grids of a class-conditional model: guided, one column per class."""

    _RULES: ClassVar[dict[str, Any]] = {**SampleConfig._RULES, "guidance_scale": at_least(0)}

    guidance_scale: float = 2.0  # classifier-free guidance; 1 = the class's prediction alone


@dataclass
class GuidedEval(EvalConfig):
    """The evaluation protocol of a class-conditional model: samples balanced over classes."""

    _RULES: ClassVar[dict[str, Any]] = {**EvalConfig._RULES, "guidance_scale": at_least(0)}

    guidance_scale: float = 2.0


@dataclass
class DitConfig(FamilyConfig):
    """A latent DiT run: LDM's images and first stage, a class-conditional transformer."""

    data: ImageData = field(default_factory=ImageData)
    model: DitModel = field(default_factory=DitModel)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    sample: GuidedSample = field(default_factory=GuidedSample)
    eval: GuidedEval = field(default_factory=GuidedEval)


class _Labelled(torch.utils.data.Dataset):
    """Latents with their class labels."""

    def __init__(self, latents: torch.utils.data.Dataset, labels: torch.Tensor) -> None:
        self.latents, self.labels = latents, labels

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[index], self.labels[index]


class LatentDiT(LatentDiffusion):
    """DiT (Peebles & Xie, ICCV 2023): a class-conditional transformer over a frozen first
    stage's latents, with classifier-free guidance.

    ``dit-imagenette`` is the paper-scale setting for a GPU (DiT-S/2 on Imagenette's ten
    ImageNet classes); ``dit-fashion-mnist`` the CPU-calibrated one on Fashion-MNIST's ten
    labels, on the first stage of ``ldm-fashion-mnist``; ``dit-tiny`` is for tests.
    """

    name = "dit"
    config_class = DitConfig

    def build_denoiser(self) -> nn.Module:
        """The DiT preset sized to the latent shape and the classes."""
        c, h, _ = self.latent_shape
        return build_dit(self.cfg.model.preset, h, c, self.cfg.model.num_classes)

    def task(self) -> Task:
        """ε-MSE of the class-conditional prediction, labels dropped to the null class."""
        labels = self.latents.labels
        if labels is None:
            raise ValueError(
                f"the DiT is class-conditional, but data.name = {self.cfg.data.name!r} has no "
                "class labels"
            )
        n = self.cfg.model.num_classes
        if int(labels.max()) >= n:
            raise ValueError(f"model.num_classes = {n}, but the data has label {int(labels.max())}")
        model, scheduler, scale = self.build_denoiser(), self.scheduler(), self.scale
        p, null = self.cfg.model.class_dropout, n

        def loss(net: nn.Module, batch: Any, gen: torch.Generator) -> torch.Tensor:
            z, y = batch
            y = drop_labels(y, p, null, gen)
            return epsilon_mse(lambda x, t: dit_eps(net, x, t, y), z * scale, scheduler, gen)

        return Task(
            model, _Labelled(self.latents, labels), loss, channel_groups=attention_groups(model)
        )

    def labels_of(self, seeds: list[int], device: torch.device) -> torch.Tensor:
        """The class each sample draws: its seed modulo the number of classes."""
        return torch.tensor([s % self.cfg.model.num_classes for s in seeds], device=device)

    def eps_fn(self, denoiser: nn.Module, seeds: list[int], settings: SamplingSettings) -> Any:
        """The guided prediction for each seed's class (``settings.guidance_scale``)."""
        labels = self.labels_of(seeds, next(denoiser.parameters()).device)
        return lambda x, t: guided_eps(denoiser, x, t, labels, settings.guidance_scale)

    def save_samples(self, samples: torch.Tensor, path: Path) -> Path:
        """A PNG grid with one column per class."""
        return save_image_grid(self.to_images(samples), path, nrow=self.cfg.model.num_classes)

    def flop_inputs(self, device: torch.device) -> tuple[Any, ...]:
        """One latent, one timestep and one class."""
        z, t = super().flop_inputs(device)
        return z, t, torch.zeros(1, dtype=torch.long, device=device)

    # ------------------------------------------------------------------ export
    def export(self, denoiser: nn.Module, out: Path) -> str:
        """A diffusers ``DiTPipeline`` folder: transformer, first stage (as ``vae``), the DDIM
        scheduler our sampler builds."""
        from diffusers import DiTPipeline  # heavy: only when exporting

        ae = copy.deepcopy(self.ae)  # DiTPipeline decodes vae.decode(z / scaling_factor)
        factor = self.scale
        if autoencoder_kind(ae) == "kl":
            factor *= float(ae.config.scaling_factor)
        ae.register_to_config(scaling_factor=factor)
        scheduler = build_sampling_scheduler(self.scheduler(), "ddim")
        DiTPipeline(transformer=denoiser, vae=ae, scheduler=scheduler).save_pretrained(out)
        return "transformer/diffusion_pytorch_model.safetensors"

    def export_card(self, folder: str) -> dict[str, Any]:
        """Plain ``DiTPipeline`` for unguided samples; a short loop over its parts for guided
        ones (DiTPipeline's guidance takes ImageNet's null class, 1000)."""
        s, n = self.cfg.sample, self.cfg.model.num_classes
        seeds = sample_seeds(0, 0, 4)
        names = CLASS_NAMES.get(self.cfg.data.name, ())
        table = ", ".join(f"{i}: {name}" for i, name in enumerate(names)) or f"0..{n - 1}"
        usage = _CARD_USAGE.format(
            folder=folder, seeds=seeds, n=n, steps=s.steps, scale=s.guidance_scale, null=n
        )
        notes = [
            f"Classes: {table}; the null class (guidance) is {n}. Sample `i` of "
            f"`sparsediff sample --seed S` draws class `(S * 1000003 + i) % {n}`. The guided loop "
            "gives sparsediff's images for the same seeds up to float rounding between kernels "
            "(one uint8 level at most).",
            "",
        ]
        card = {
            "library_name": "diffusers",
            "pipeline_tag": "unconditional-image-generation",
            "tags": ["dit", "diffusers:DiTPipeline", "class-conditional"],
        }
        return {
            "title": "class-conditional latent DiT",
            "card": card,
            "usage": usage,
            "notes": notes,
        }


_CARD_USAGE = """\
import torch
from diffusers import DiTPipeline

pipe = DiTPipeline.from_pretrained("{folder}")
seeds = {seeds}  # those of `sparsediff sample --seed 0 --num 4`
labels = [s % {n} for s in seeds]
# unguided: plain DiTPipeline
images = pipe(labels, guidance_scale=1.0, num_inference_steps={steps},
              generator=[torch.Generator().manual_seed(s) for s in seeds]).images
# guided ({scale}): DiTPipeline's guidance asks for class 1000, this model's null class is {null}
pipe.scheduler.set_timesteps({steps})
z = torch.cat([torch.randn(1, pipe.transformer.config.in_channels,
                           pipe.transformer.config.sample_size,
                           pipe.transformer.config.sample_size,
                           generator=torch.Generator().manual_seed(s)) for s in seeds])
y = torch.tensor(labels)
with torch.no_grad():
    for t in pipe.scheduler.timesteps:
        both = pipe.transformer(torch.cat([z, z]), timestep=t.expand(2 * len(z)),
                                class_labels=torch.cat([y, torch.full_like(y, {null})])).sample
        cond, uncond = both.chunk(2)
        z = pipe.scheduler.step(uncond + {scale} * (cond - uncond), t, z).prev_sample
    images = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1) / 2 + 0.5
"""
