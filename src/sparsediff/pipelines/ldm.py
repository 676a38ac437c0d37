"""Latent Diffusion with a sparse UNet, as in the study (LDM-4, VQ-f4 first stage).

Stage 1 trains (or loads) a dense autoencoder; it is then frozen and the training set is encoded
once into a latent cache. Stage 2 trains the UNet in latent space with the shared loop, the
sparse engine attached to the UNet and its EMA copy.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from sparsediff.config import TrainConfig
from sparsediff.data.images import build_image_dataset, collate_skip_none
from sparsediff.data.latents import LatentCache, LatentDataset
from sparsediff.diffusion.losses import epsilon_mse
from sparsediff.diffusion.samplers import SamplingSettings, build_sampling_scheduler
from sparsediff.imaging import to_uint8
from sparsediff.io import read_json, write_json
from sparsediff.locks import wait_for
from sparsediff.models.autoencoder import (
    AE_PRESETS,
    AUTOENCODER_KINDS,
    autoencoder_fingerprint,
    autoencoder_kind,
    autoencoder_loss,
    build_autoencoder,
    decode_latents,
    encode_latents,
    load_autoencoder,
    reconstruct,
)
from sparsediff.models.unet import UNET_PRESETS, build_unet, stream_groups
from sparsediff.pipelines.base import FamilyConfig, Pipeline, sample_seeds
from sparsediff.sections import POSITIVE, Section, at_least
from sparsediff.training.distributed import Dist, barrier
from sparsediff.training.loop import Task, Trainer, seed_stage

AE_DIR = "autoencoder"
LATENT_FILE = "latent.json"  # latent shape and scale, for sampling from the finished run


@dataclass
class ImageData(Section):
    """An LDM run's ``data`` section: the image dataset and its latent cache."""

    _RULES: ClassVar[dict[str, Any]] = {
        "resolution": at_least(1),
        "max_train": at_least(0),
        "max_val": at_least(0),
    }
    _PATHS: ClassVar[tuple[str, ...]] = ("path", "split_file", "cache_dir")

    name: str = "fashion-mnist"  # fashion-mnist | celebahq | lsun-bedrooms | imagenette | folder
    path: str = ""  # local dataset path; "" = the built-in default location
    resolution: int = 32  # image side after centre crop + resize (or padding)
    max_train: int = 0  # 0 = all
    max_val: int = 0
    split_seed: int = 0
    split_file: str = ""
    cache_dir: str = ""  # the latent cache; "" = RUN_DIR/latents


@dataclass
class UNetConfig(Section):
    """An LDM run's ``model`` section: the denoising UNet."""

    _RULES: ClassVar[dict[str, Any]] = {
        "preset": tuple(UNET_PRESETS),
        "channels": ((lambda v: all(c >= 1 for c in v)), "must be positive channel counts"),
    }

    preset: str = "fmnist"  # models.unet.UNET_PRESETS: ldm4, small, fmnist, tiny, ...
    # the UNet's block channels in place of the preset's ([] = the preset's); an attention head
    # keeps the preset's width, capped at the narrowest block (models.unet.unet_config)
    channels: list[int] = field(default_factory=list)


@dataclass
class AutoencoderConfig(Section):
    """Stage 1 of a latent pipeline: the dense, frozen first-stage autoencoder."""

    _RULES: ClassVar[dict[str, Any]] = {
        "kind": AUTOENCODER_KINDS,
        "preset": tuple(AE_PRESETS),
        "steps": at_least(1),
        "batch_size": at_least(1),
        "lr": POSITIVE,
    }
    _PATHS: ClassVar[tuple[str, ...]] = ("pretrained", "dir")

    kind: str = "vq"  # vq | kl
    preset: str = "fmnist-f4"
    pretrained: str = ""  # a local diffusers-format directory; skips stage-1 training
    dir: str = ""  # where stage 1 is kept; "" = RUN_DIR/autoencoder. Runs sharing a dir share it
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-4
    scale_latents: bool = False  # LDM's scale_by_std (KL); VQ-f4 keeps 1.0


@dataclass
class LdmConfig(FamilyConfig):
    """A Latent Diffusion run: images, a UNet denoiser and its first stage."""

    data: ImageData = field(default_factory=ImageData)
    model: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)


def _unet_fn(unet: nn.Module) -> Any:
    return lambda x, t: unet(x, t).sample


def _first_image(data: torch.utils.data.Dataset) -> torch.Tensor:
    """The first readable image (unreadable ones are None); an error when there is none."""
    for i in range(len(data)):
        if (image := data[i]) is not None:
            return image
    raise ValueError(f"no readable image in the {len(data)} files of {data.identity['path']}")


@contextmanager
def _one_builder(place: Path, dist: Dist, what: str) -> Iterator[None]:
    """Hold ``place``'s lock (rank 0, for all ranks) while it is checked and built: runs that
    share it wait for the first to finish, then find it built."""
    lock = place.with_name(f".{place.name}.lock")
    with wait_for(lock, f"{what} {place}") if dist.is_main else nullcontext():
        barrier(dist)
        yield
        barrier(dist)


class _Reconstruction(nn.Module):
    """The autoencoder's training forward, so DDP sees (and syncs) one ``forward`` call."""

    def __init__(self, ae: nn.Module) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and the codebook (VQ) or KL term."""
        return reconstruct(self.ae, x)


class LatentDiffusion(Pipeline):
    """LDM (Rombach et al., CVPR 2022): a UNet denoiser over a frozen autoencoder's latents.

    The ``ldm-celebahq`` / ``ldm-lsun-bedrooms`` presets reproduce the study's LDM-4 setting
    (VQ-f4 first stage, 274 M-parameter UNet, β 0.0015 → 0.0195 linear in √β, T = 1000).
    """

    name = "ldm"
    config_class = LdmConfig
    run_entries = (AE_DIR, "autoencoder-*.pt", "autoencoder-*.jsonl", "latents", LATENT_FILE)

    def __init__(self, cfg: LdmConfig, run_dir: str | Path) -> None:
        super().__init__(cfg, run_dir)
        self.ae: nn.Module | None = None
        self.latents: LatentDataset | None = None
        self.latent_shape: tuple[int, int, int] | None = None
        self.scale = 1.0

    # ------------------------------------------------------------------ data and stage 1
    def image_dataset(self, split: str = "train") -> torch.utils.data.Dataset:
        """The configured image dataset (Fashion-MNIST by default)."""
        d = self.cfg.data
        return build_image_dataset(
            d.name,
            self.local_path(d.path),
            d.resolution,
            split,
            max_train=d.max_train or None,
            max_val=d.max_val or None,
            split_seed=d.split_seed,
            split_file=self.local_path(d.split_file),
        )

    def autoencoder_dir(self) -> Path:
        """Where this run's first stage lives (a local pretrained one, or trained in the run)."""
        ae = self.cfg.autoencoder
        return self.local_path(ae.pretrained or ae.dir) or self.run_dir / AE_DIR

    def _train_autoencoder(self, dist: Dist, resume: bool) -> nn.Module:
        """Stage 1, built once: a run beside this one that shares the first stage (a study's
        other process) waits until it is saved, then loads it."""
        out = self.autoencoder_dir()
        with _one_builder(out, dist, "the first stage"):
            return self._load_or_train_autoencoder(out, dist, resume)

    def _load_or_train_autoencoder(self, out: Path, dist: Dist, resume: bool) -> nn.Module:
        """Stage 1: train the dense autoencoder with the shared loop (L1 + L2 + codebook/KL)."""
        cfg, ae_cfg = self.cfg, self.cfg.autoencoder
        if out.exists():
            try:
                return load_autoencoder(out)[0]
            except Exception as err:  # an older version killed mid-save: any loading error
                tqdm.write(
                    f"{out} is incomplete or unreadable ({err}); training it again", file=sys.stderr
                )
                if dist.is_main:
                    shutil.rmtree(out)
                barrier(dist)
        data = self.image_dataset()
        channels = _first_image(data).shape[0]  # 1 for Fashion-MNIST, 3 for photos
        seed_stage(cfg.seed, "autoencoder")
        ae = build_autoencoder(
            ae_cfg.kind, ae_cfg.preset, in_channels=channels, out_channels=channels
        )
        # the autoencoder's own budget; the machinery settings of the run's loop
        machinery = (
            "precision",
            "checkpoint_every",
            "log_every",
            "num_workers",
            "device",
            "progress",
            "tensorboard",
        )
        train_cfg = TrainConfig(
            steps=ae_cfg.steps,
            batch_size=ae_cfg.batch_size,
            lr=ae_cfg.lr,
            weight_decay=0.0,
            **{key: getattr(cfg.train, key) for key in machinery},
        )
        task = Task(
            model=_Reconstruction(ae),
            dataset=data,
            loss=lambda model, x, gen: autoencoder_loss(ae, x, recon=model(x))[0],
            collate=collate_skip_none,
            use_ema=False,
        )
        trainer = Trainer(
            task,
            train_cfg,
            self.run_dir,
            dist,
            seed=cfg.seed,
            checkpoint_name="autoencoder-checkpoint.pt",
            log_name="autoencoder-metrics.jsonl",
            desc="autoencoder",
        )
        if resume:
            trainer.maybe_resume()
        trainer.train()
        if dist.is_main:  # beside, then renamed: a kill never leaves a half-written folder
            tmp = out.with_name(f".{out.name}.partial")
            shutil.rmtree(tmp, ignore_errors=True)
            ae.save_pretrained(tmp)
            os.replace(tmp, out)
        barrier(dist)
        return load_autoencoder(out)[0]

    def _latent_dataset(self, ae: nn.Module, dist: Dist) -> LatentDataset:
        """Encode the training set once; rank 0 builds the cache, the others load it."""
        cfg = self.cfg
        cache_dir = self.local_path(cfg.data.cache_dir) or self.run_dir / "latents"
        fingerprint = autoencoder_fingerprint(ae)  # hashes every weight: once per run
        extra = {
            "data": {k: v for k, v in vars(cfg.data).items() if not k.startswith("raster")},
        }

        def build() -> LatentDataset:
            return LatentCache.build_or_load(
                cache_dir,
                lambda x: encode_latents(ae, x),
                fingerprint,
                self.image_dataset(),
                64,
                extra,
                device=dist.device,
                progress=cfg.train.progress,
            )

        with _one_builder(cache_dir, dist, "the latent cache"):
            if dist.is_main:
                latents = build()
            barrier(dist)
            if not dist.is_main:
                latents = build()
        return latents

    def prepare(self, dist: Dist, resume: bool) -> None:
        """Stage 1 (or the pretrained first stage), then the latent cache."""
        if self.cfg.autoencoder.pretrained:
            ae = load_autoencoder(self.autoencoder_dir())[0]
        else:
            ae = self._train_autoencoder(dist, resume)
        self.ae = ae.to(dist.device).eval().requires_grad_(False)
        self.latents = self._latent_dataset(self.ae, dist)
        self.latent_shape = tuple(self.latents.latent_shape)
        # LDM's scale_by_std when asked for; VQ-f4 keeps 1.0 as in the study's configs
        self.scale = self.latents.scale_factor if self.cfg.autoencoder.scale_latents else 1.0
        if dist.is_main:
            write_json(
                self.run_dir / LATENT_FILE, {"shape": list(self.latent_shape), "scale": self.scale}
            )

    def summary(self) -> dict[str, Any]:
        """Latent shape and scale, and how many training images were unreadable."""
        skipped = self.latents.meta.get("skipped", 0)
        return {"latent_shape": list(self.latent_shape), "scale": self.scale, "skipped": skipped}

    # ------------------------------------------------------------------ stage 2
    def build_denoiser(self) -> nn.Module:
        """The UNet preset sized to the latent shape (channels, height, width)."""
        c, h, _ = self.latent_shape
        m = self.cfg.model
        return build_unet(m.preset, m.channels, sample_size=h, in_channels=c, out_channels=c)

    def task(self) -> Task:
        """ε-MSE on (scaled) latents."""
        unet, scheduler, scale = self.build_denoiser(), self.scheduler(), self.scale

        def loss(model: nn.Module, z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return epsilon_mse(_unet_fn(model), z * scale, scheduler, generator=gen)

        # walked only when asked for: the walk refuses UNet layouts it does not know
        groups = stream_groups(unet) if self.cfg.sparse.tie_stream else []
        return Task(unet, self.latents, loss, stream_groups=groups)

    def load(self, device: torch.device) -> None:
        """The frozen first stage and the latent shape and scale of a finished run."""
        path = self.run_dir / LATENT_FILE
        info = read_json(path)
        shape, scale = (info.get("shape"), info.get("scale")) if isinstance(info, dict) else (0, 0)
        shape_ok = isinstance(shape, list) and len(shape) == 3
        shape_ok = shape_ok and all(isinstance(v, int) and v > 0 for v in shape)
        scale_ok = isinstance(scale, int | float) and not isinstance(scale, bool)
        if not (shape_ok and scale_ok and math.isfinite(scale) and scale > 0):
            raise ValueError(
                f"{path}: not a latent record (shape: three positive integers, scale: a "
                f"positive number); got {info!r}"
            )
        self.latent_shape, self.scale = tuple(shape), float(scale)
        self.ae = load_autoencoder(self.autoencoder_dir())[0].to(device).eval()

    @torch.no_grad()
    def generate(
        self,
        denoiser: nn.Module,
        seeds: list[int],
        settings: SamplingSettings,
        progress: bool = False,
    ) -> torch.Tensor:
        """Images in [-1, 1]: latents from the UNet, decoded by the first stage."""
        device = next(denoiser.parameters()).device
        shape = (len(seeds), *self.latent_shape)
        model_fn = self.eps_fn(denoiser, seeds, settings)
        z = self.run_chain(model_fn, shape, device, seeds, settings, progress)
        return decode_latents(self.ae, z / self.scale).clamp(-1, 1)

    def eps_fn(self, denoiser: nn.Module, seeds: list[int], settings: SamplingSettings) -> Any:
        """The ``model_fn(x_t, t) -> ε`` the chain samples with (a UNet's prediction)."""
        return _unet_fn(denoiser)

    def to_images(self, samples: torch.Tensor) -> torch.Tensor:
        """uint8 images."""
        return to_uint8(samples).cpu()

    # ------------------------------------------------------------------ evaluation
    def reference(
        self, split: str, size: int, offset: int = 0
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Real images of ``split``."""
        data = self.image_dataset(split)
        images = [data[i] for i in range(offset, min(offset + size, len(data)))]
        images = [im for im in images if im is not None]
        if not images:
            raise ValueError(f"the {split} split has no images from item {offset} on")
        images = torch.stack(images)
        d = self.cfg.data
        return to_uint8(images), {"dataset": d.name, "path": d.path, "max_val": d.max_val}

    def first_stage_id(self) -> str | None:
        """The autoencoder's fingerprint (hashes every weight: computed once)."""
        if getattr(self, "_ae_id", None) is None:
            self._ae_id = autoencoder_fingerprint(self.ae)
        return self._ae_id

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
        """Real images encoded to latents and decoded as samples are (VQ: quantised)."""
        device = next(self.ae.parameters()).device
        out = []
        for batch in images.split(batch_size):
            x = batch.to(device).float() / 127.5 - 1.0
            out.append(to_uint8(decode_latents(self.ae, encode_latents(self.ae, x)).clamp(-1, 1)))
        return torch.cat(out).cpu()

    def flop_inputs(self, device: torch.device) -> tuple[Any, ...]:
        """One latent and one timestep."""
        z = torch.zeros(1, *self.latent_shape, device=device)
        return z, torch.zeros(1, dtype=torch.long, device=device)

    def decode_flops(self, device: torch.device) -> float:
        """The first-stage decoder, once per sample."""
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            self.ae.decode(torch.zeros(1, *self.latent_shape, device=device))
        return float(counter.get_total_flops())

    # ------------------------------------------------------------------ export
    def export(self, denoiser: nn.Module, out: Path) -> str:
        """A diffusers ``LDMPipeline`` folder that gives our images for the same sample seeds."""
        from diffusers import LDMPipeline  # heavy: only when exporting

        _, height, width = self.latent_shape
        if height != width:
            raise ValueError(f"LDMPipeline samples square latents; this run's are {height}×{width}")
        # LDMPipeline decodes vqvae.decode(z / scaling_factor) (a VQModel quantises inside
        # decode, as we do). Ours: VQ decodes z / scale, KL z / scale / its own scaling factor.
        ae = copy.deepcopy(self.ae)  # this pipeline keeps sampling with its own settings
        factor = self.scale
        if autoencoder_kind(ae) == "kl":
            factor *= float(ae.config.scaling_factor)
        ae.register_to_config(scaling_factor=factor)
        # the scheduler our DDIM sampler builds (CompVis settings: leading, offset 1, ᾱ_0 last)
        scheduler = build_sampling_scheduler(self.scheduler(), "ddim")
        LDMPipeline(vqvae=ae, unet=denoiser, scheduler=scheduler).save_pretrained(out)
        return "unet/diffusion_pytorch_model.safetensors"

    def export_card(self, folder: str) -> dict[str, Any]:
        """Plain diffusers, with the seeds of ``sparsediff sample --seed 0 --num 4``."""
        s = self.cfg.sample
        steps, eta = (s.steps, s.eta) if s.sampler == "ddim" else (50, 0.0)
        usage = (
            "import torch\nfrom diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{folder}")\n'
            f"seeds = {sample_seeds(0, 0, 4)}  # those of `sparsediff sample --seed 0 --num 4`\n"
            f"images = pipe(batch_size=len(seeds), num_inference_steps={steps}, eta={eta}, "
            "generator=[torch.Generator().manual_seed(s) for s in seeds]).images\n"
        )
        note = (
            "Same images as sparsediff for the same sample seeds, bit for bit on the CPU: at "
            "η = 0 with one generator per image as above; at any η draw one image per call "
            "after `torch.manual_seed(seed)`, passing no generator (LDMPipeline draws its DDIM "
            "noise from the global generator). Floats can differ by ~1e-6 between batch sizes "
            "(CPU kernels), below one uint8 level."
        )
        card = {
            "library_name": "diffusers",
            "pipeline_tag": "unconditional-image-generation",
            "tags": ["latent-diffusion", "diffusers:LDMPipeline"],
        }
        return {"title": "Latent Diffusion", "card": card, "usage": usage, "notes": [note, ""]}

    # ------------------------------------------------------------------ studies
    @classmethod
    def study_overrides(cls, cfg: LdmConfig, shared_dir: Path) -> dict[str, Any]:
        """One dense, frozen first stage and latent cache per dataset, unless the run sets one.

        The comparison is about the denoiser; the first cell trains the autoencoder for all.
        """
        if cfg.autoencoder.dir or cfg.autoencoder.pretrained:
            return {}
        out = {"autoencoder.dir": str(shared_dir / AE_DIR)}
        if not cfg.data.cache_dir:
            out["data.cache_dir"] = str(shared_dir / "latents")
        return out
