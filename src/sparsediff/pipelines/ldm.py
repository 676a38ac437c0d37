"""Latent Diffusion with a sparse UNet, as in the study (LDM-4, VQ-f4 first stage).

Stage 1 trains (or loads) a dense autoencoder; it is then frozen and the training set is encoded
once into a latent cache. Stage 2 trains the UNet in latent space with the shared loop, the
sparse engine attached to the UNet and its EMA copy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsediff.config import RunConfig, TrainConfig
from sparsediff.data.images import build_image_dataset, collate_skip_none
from sparsediff.data.latents import LatentCache
from sparsediff.diffusion.losses import epsilon_mse
from sparsediff.diffusion.samplers import sample as run_sampler
from sparsediff.diffusion.schedules import make_scheduler
from sparsediff.models.autoencoder import (
    autoencoder_fingerprint,
    autoencoder_loss,
    build_autoencoder,
    decode_latents,
    load_autoencoder,
    reconstruct,
)
from sparsediff.models.unet import build_unet
from sparsediff.pipelines.common import (
    export_weights,
    load_weights,
    prepare_run_dir,
    save_image_grid,
    write_done,
)
from sparsediff.training.distributed import Dist, barrier, setup
from sparsediff.training.loop import Task, Trainer

AE_DIR = "autoencoder"


def image_dataset(cfg: RunConfig, split: str = "train") -> torch.utils.data.Dataset:
    """The configured image dataset (Fashion-MNIST by default)."""
    d = cfg.data
    if d.name == "fashion-mnist":
        cap = d.max_train if split == "train" else d.max_val
        return build_image_dataset(
            d.name, d.path or None, d.resolution, split, max_items=cap or None
        )
    return build_image_dataset(
        d.name,
        d.path or None,
        d.resolution,
        split,
        max_train=d.max_train or None,
        max_val=d.max_val or None,
        split_seed=d.split_seed,
        split_file=d.split_file or None,
    )


def _unet_model_fn(unet: nn.Module) -> Any:
    return lambda x, t: unet(x, t).sample


# ----------------------------------------------------------------------------- stage 1
class _Reconstruction(nn.Module):
    """The autoencoder's training forward, so DDP sees (and syncs) one ``forward`` call."""

    def __init__(self, ae: nn.Module) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and the codebook (VQ) or KL term."""
        return reconstruct(self.ae, x)


def autoencoder_dir(cfg: RunConfig, run_dir: Path) -> Path:
    """Where this run's first stage lives (a local pretrained one, or trained in the run)."""
    if cfg.autoencoder.pretrained:
        return Path(cfg.autoencoder.pretrained)
    return Path(cfg.autoencoder.dir) if cfg.autoencoder.dir else run_dir / AE_DIR


def train_autoencoder(cfg: RunConfig, run_dir: Path, dist: Dist, resume: bool) -> nn.Module:
    """Stage 1: train the dense autoencoder with the shared loop (L1 + L2 + codebook/KL)."""
    ae_cfg = cfg.autoencoder
    out = autoencoder_dir(cfg, run_dir)
    if (out / "config.json").exists():
        ae, _ = load_autoencoder(out)
        return ae
    data = image_dataset(cfg)
    channels = int(data[0].shape[0])  # 1 for Fashion-MNIST, 3 for photos
    ae = build_autoencoder(ae_cfg.kind, ae_cfg.preset, in_channels=channels, out_channels=channels)
    train_cfg = TrainConfig(
        steps=ae_cfg.steps,
        batch_size=ae_cfg.batch_size,
        lr=ae_cfg.lr,
        weight_decay=0.0,
        precision=cfg.train.precision,
        checkpoint_every=cfg.train.checkpoint_every,
        log_every=cfg.train.log_every,
        num_workers=cfg.train.num_workers,
        device=cfg.train.device,
        progress=cfg.train.progress,
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
        run_dir,
        dist,
        seed=cfg.seed,
        checkpoint_name="autoencoder-checkpoint.pt",
        log_name="autoencoder-metrics.jsonl",
        desc="autoencoder",
    )
    if resume:
        trainer.maybe_resume()
    trainer.train()
    if dist.is_main:
        ae.save_pretrained(out)
    barrier(dist)
    ae, _ = load_autoencoder(out)
    return ae


def first_stage(cfg: RunConfig, run_dir: Path, dist: Dist, resume: bool) -> nn.Module:
    """The frozen first stage: loaded from ``autoencoder.pretrained`` or trained here."""
    if cfg.autoencoder.pretrained:
        ae, _ = load_autoencoder(cfg.autoencoder.pretrained)
    else:
        ae = train_autoencoder(cfg, run_dir, dist, resume)
    return ae.to(dist.device).eval().requires_grad_(False)


def latent_dataset(cfg: RunConfig, run_dir: Path, ae: nn.Module, dist: Dist) -> Any:
    """Encode the training set once; rank 0 builds the cache, the others load it."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else run_dir / "latents"
    extra = {
        "data": {k: v for k, v in vars(cfg.data).items() if not k.startswith("raster")},
        "autoencoder": autoencoder_fingerprint(ae),
    }
    if dist.is_main:
        latents = LatentCache.build_or_load(cache_dir, ae, image_dataset(cfg), 64, extra)
    barrier(dist)
    if not dist.is_main:
        latents = LatentCache.build_or_load(cache_dir, ae, image_dataset(cfg), 64, extra)
    return latents


# ----------------------------------------------------------------------------- stage 2
def build_denoiser(cfg: RunConfig, latent_shape: tuple[int, int, int]) -> nn.Module:
    """The UNet preset sized to the latent shape (channels, height, width)."""
    c, h, _ = latent_shape
    return build_unet(cfg.model.preset, sample_size=h, in_channels=c, out_channels=c)


def latent_scale(cfg: RunConfig, latents: Any) -> float:
    """LDM's scale_by_std when asked for; VQ-f4 keeps 1.0 as in the study's configs."""
    return float(latents.scale_factor) if cfg.autoencoder.scale_latents else 1.0


@torch.no_grad()
def generate(
    cfg: RunConfig,
    unet: nn.Module,
    ae: nn.Module,
    num: int,
    latent_shape: tuple[int, int, int],
    scale: float,
    seed: int,
    sampler: str,
    steps: int,
    eta: float,
) -> torch.Tensor:
    """Sample ``num`` images in [-1, 1] from the UNet, decoded by the first stage."""
    device = next(unet.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    z = run_sampler(
        _unet_model_fn(unet),
        (num, *latent_shape),
        make_scheduler(
            cfg.diffusion.schedule,
            cfg.diffusion.timesteps,
            cfg.diffusion.beta_start,
            cfg.diffusion.beta_end,
        ),
        sampler=sampler,
        steps=steps,
        eta=eta,
        generator=gen,
        device=device,
    )
    return decode_latents(ae, z / scale).clamp(-1, 1)


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train an LDM run end to end; returns a summary (also written to ``done.json``)."""
    run_dir = Path(run_dir)
    dist = setup(cfg.train.device)
    torch.manual_seed(cfg.seed)
    prepare_run_dir(cfg, run_dir, dist)
    ae = first_stage(cfg, run_dir, dist, resume)
    latents = latent_dataset(cfg, run_dir, ae, dist)
    shape = tuple(latents.latent_shape)
    scale = latent_scale(cfg, latents)
    unet = build_denoiser(cfg, shape)
    scheduler = make_scheduler(
        cfg.diffusion.schedule,
        cfg.diffusion.timesteps,
        cfg.diffusion.beta_start,
        cfg.diffusion.beta_end,
    )

    def loss(model: nn.Module, z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return epsilon_mse(_unet_model_fn(model), z * scale, scheduler, generator=gen)

    def sample_grid(model: nn.Module, path: Path) -> None:
        s = cfg.sample
        images = generate(cfg, model, ae, s.num, shape, scale, cfg.seed, s.sampler, s.steps, s.eta)
        save_image_grid(images, path)

    task = Task(unet, latents, loss, sample=sample_grid)
    trainer = Trainer(task, cfg.train, run_dir, dist, seed=cfg.seed, sparse_cfg=cfg.sparse)
    if resume:
        trainer.maybe_resume()
    state = trainer.train()
    summary: dict[str, Any] = {"step": state.step, "latent_shape": list(shape), "scale": scale}
    if state.step >= cfg.train.steps and dist.is_main:
        final = trainer.ema.module if trainer.ema is not None else trainer.model
        export_weights(final, run_dir)
        (run_dir / "latent.json").write_text(json.dumps({"shape": list(shape), "scale": scale}))
        trainer.write_samples(run_dir / "samples.png")
        if trainer.sparse is not None:
            summary["sparse"] = _json_stats(trainer.sparse.stats())
        write_done(run_dir, summary)
    barrier(dist)
    return summary


def _json_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Keep the JSON-friendly part of the engine's stats."""
    return json.loads(json.dumps(stats, default=lambda o: None))


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Rebuild a finished run's UNet (EMA weights), first stage and latent info for sampling."""
    from sparsediff.config import read_run_config

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    info = json.loads((run_dir / "latent.json").read_text())
    shape = tuple(info["shape"])
    unet = load_weights(build_denoiser(cfg, shape), run_dir).to(device).eval()
    ae, _ = load_autoencoder(autoencoder_dir(cfg, run_dir))
    ae = ae.to(device).eval()
    return {"cfg": cfg, "unet": unet, "ae": ae, "shape": shape, "scale": float(info["scale"])}


def sample_to_file(
    run_dir: str | Path,
    out: str | Path,
    num: int,
    sampler: str,
    steps: int,
    eta: float,
    seed: int,
    device: str,
) -> Path:
    """``sparsediff sample`` for LDM runs: one PNG grid."""
    run = load_trained(run_dir, device)
    images = generate(
        run["cfg"],
        run["unet"],
        run["ae"],
        num,
        run["shape"],
        run["scale"],
        seed,
        sampler,
        steps,
        eta,
    )
    return save_image_grid(images, out)
