"""ChiroDiff with a sparse denoiser: diffusion over pen-point sequences (Das et al., ICLR 2023).

The sequences (velocity or absolute, 3 channels) are diffused directly; the bi-GRU denoiser is
trained with the shared loop and the sparse engine attached to its GRU and Linear weights. At
sampling time sequence lengths are drawn from the training set's length distribution and the
pen channel is thresholded when decoding to strokes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparsediff.config import RunConfig, read_run_config
from sparsediff.data.raster import rasterize, save_png_grid, save_svg
from sparsediff.data.sketch_ops import sequences_to_sketches
from sparsediff.data.stroke_dataset import (
    StrokeSequenceDataset,
    collate_sequences,
    load_stroke_dataset,
)
from sparsediff.diffusion.losses import epsilon_mse
from sparsediff.diffusion.samplers import sample as run_sampler
from sparsediff.diffusion.schedules import make_scheduler
from sparsediff.models.chirodiff import build_chirodiff_denoiser, masked_mse
from sparsediff.pipelines.common import export_weights, load_weights, prepare_run_dir, write_done
from sparsediff.training.distributed import barrier, setup
from sparsediff.training.loop import Task, Trainer

LENGTHS_FILE = "lengths.json"


def stroke_dataset(cfg: RunConfig, split: str = "train") -> StrokeSequenceDataset:
    """The configured stroke dataset (KanjiVG from the installed package by default)."""
    d = cfg.data
    return load_stroke_dataset(
        d.name,
        d.path or None,
        split,
        representation=d.representation,
        category=d.category or None,
        limit=d.max_train or None,
        seed=d.split_seed,
        rdp_epsilon=d.rdp_epsilon or None,
        max_len=d.max_len,
        step=d.resample_step or None,
        extent=d.extent,
    )


def build_denoiser(cfg: RunConfig) -> nn.Module:
    """The configured sequence denoiser (bi-GRU by default)."""
    m = cfg.model
    kwargs: dict[str, Any] = {
        "representation": cfg.data.representation,
        "time_dim": m.time_dim,
        "num_timesteps": cfg.diffusion.timesteps,
    }
    if m.arch == "birnn":
        kwargs.update(hidden=m.hidden, layers=m.layers)
    else:
        kwargs.update(width=m.hidden, layers=m.layers, heads=m.heads)
    return build_chirodiff_denoiser(m.arch, **kwargs)


def scheduler(cfg: RunConfig) -> Any:
    """ChiroDiff's schedule: linear beta scaled by 1000/T."""
    d = cfg.diffusion
    return make_scheduler(d.schedule, d.timesteps, d.beta_start, d.beta_end)


def sequence_loss(
    net: nn.Module, batch: dict[str, torch.Tensor], sched: Any, gen: torch.Generator
) -> torch.Tensor:
    """ChiroDiff's objective: epsilon-MSE masked to valid points, normalised by length."""
    lengths = batch["lengths"]
    return epsilon_mse(
        lambda x, t: net(x, t, lengths),
        batch["x"],
        sched,
        generator=gen,
        reduce_fn=lambda pred, target: masked_mse(pred, target, lengths),
    )


@torch.no_grad()
def generate(
    cfg: RunConfig,
    model: nn.Module,
    lengths: np.ndarray,
    num: int,
    seed: int,
    sampler: str,
    steps: int | None,
    eta: float,
) -> list[list[np.ndarray]]:
    """Sample ``num`` sketches; lengths are drawn from the training distribution."""
    device = next(model.parameters()).device
    lens = torch.as_tensor(np.random.default_rng(seed).choice(lengths, size=num), device=device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return model(x, t, lens)

    x = run_sampler(
        model_fn,
        (num, int(lens.max()), 3),
        scheduler(cfg),
        sampler=sampler,
        steps=steps,
        eta=eta,
        generator=gen,
        device=device,
        variance_scale=cfg.sample.variance_scale,
    )
    return sequences_to_sketches(x, lens, cfg.data.representation, cfg.sample.pen_threshold)


def render(cfg: RunConfig, sketches: list[list[np.ndarray]]) -> torch.Tensor:
    """Rasterise sketches with the one shared rasteriser: uint8 (N, 1, S, S)."""
    d = cfg.data
    images = [rasterize(s, d.raster_size, d.raster_line_width) for s in sketches]
    return torch.from_numpy(np.stack(images))[:, None]


def write_sketches(cfg: RunConfig, sketches: list[list[np.ndarray]], out: Path) -> Path:
    """A PNG grid at ``out`` and one SVG per sketch beside it (``<stem>-svg/``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    nrow = max(1, int(np.ceil(np.sqrt(len(sketches)))))
    save_png_grid(sketches, out, nrow=nrow, size=cfg.data.raster_size)
    svg_dir = out.with_name(out.stem + "-svg")
    svg_dir.mkdir(exist_ok=True)
    for i, sketch in enumerate(sketches):
        save_svg(sketch, svg_dir / f"{i:04d}.svg")
    return out


def train(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train a ChiroDiff run end to end; returns a summary (also written to ``done.json``)."""
    run_dir = Path(run_dir)
    dist = setup(cfg.train.device)
    torch.manual_seed(cfg.seed)
    prepare_run_dir(cfg, run_dir, dist)
    data = stroke_dataset(cfg)
    if dist.is_main:
        (run_dir / LENGTHS_FILE).write_text(json.dumps(data.lengths.tolist()))
    model = build_denoiser(cfg)
    sched = scheduler(cfg)

    def loss(net: nn.Module, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        return sequence_loss(net, batch, sched, gen)

    def sample_grid(net: nn.Module, path: Path) -> None:
        s = cfg.sample
        sketches = generate(cfg, net, data.lengths, s.num, cfg.seed, s.sampler, s.steps, s.eta)
        write_sketches(cfg, sketches, path)

    task = Task(model, data, loss, collate=collate_sequences, sample=sample_grid)
    trainer = Trainer(task, cfg.train, run_dir, dist, seed=cfg.seed, sparse_cfg=cfg.sparse)
    if resume:
        trainer.maybe_resume()
    state = trainer.train()
    summary: dict[str, Any] = {"step": state.step, "train_sketches": len(data)}
    if state.step >= cfg.train.steps and dist.is_main:
        final = trainer.ema.module if trainer.ema is not None else trainer.model
        export_weights(final, run_dir)
        trainer.write_samples(run_dir / "samples.png")
        if trainer.sparse is not None:
            summary["sparse"] = json.loads(json.dumps(trainer.sparse.stats(), default=str))
        write_done(run_dir, summary)
    barrier(dist)
    return summary


def load_trained(run_dir: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Rebuild a finished run's denoiser (EMA weights) and its length distribution."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    model = load_weights(build_denoiser(cfg), run_dir).to(device).eval()
    lengths = np.array(json.loads((run_dir / LENGTHS_FILE).read_text()), dtype=np.int64)
    return {"cfg": cfg, "model": model, "lengths": lengths}


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
    """``sparsediff sample`` for sketch runs: a PNG grid plus SVGs."""
    run = load_trained(run_dir, device)
    sketches = generate(run["cfg"], run["model"], run["lengths"], num, seed, sampler, steps, eta)
    return write_sketches(run["cfg"], sketches, Path(out))
