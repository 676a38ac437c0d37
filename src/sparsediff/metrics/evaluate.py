"""``sparsediff evaluate``: one documented protocol for every run (see docs/evaluation.md).

Samples are generated in batches by seed: the batch that starts at sample ``i`` draws from a
generator seeded by ``(seed, i)``, so a large evaluation can be split into seed ranges
(``--seed-range A:B`` with A a multiple of the batch size) on several machines or resumed after
an interruption; each range is saved as a shard and the metrics are computed once the shards
cover all samples. Reference features are cached per dataset split, size, resolution, rendering
and feature network. Costs (parameters, FLOPs per network evaluation and per sample, training
FLOPs of the run) come from the sparse engine's accounting.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparsediff.config import RunConfig, read_run_config
from sparsediff.metrics import (
    PREPROCESSING_VERSION,
    InceptionFeatures,
    ReferenceCache,
    compute_metrics,
    extract_features,
    key_digest,
    quantize_images,
    reference_key,
)
from sparsediff.pipelines.common import save_image_grid
from sparsediff.sparsity.flops import count_parameters, inference_flops, training_flops_per_step
from sparsediff.training.checkpoint import load_checkpoint


def default_cache_dir() -> Path:
    """Reference statistics cache: ``$SPARSEDIFF_CACHE`` or ``~/.cache/sparsediff``."""
    root = os.environ.get("SPARSEDIFF_CACHE") or Path.home() / ".cache" / "sparsediff"
    return Path(root) / "fid-reference"


@dataclass
class Protocol:
    """Everything that moves a sample-based number; recorded with it."""

    num_samples: int
    sampler: str
    steps: int
    eta: float
    seed: int
    ema: bool
    batch_size: int

    def digest(self) -> str:
        """Short id of the generation settings (names the shard folder)."""
        return key_digest(vars(self))[:12]


class _Adapter:
    """What evaluation needs from a pipeline."""

    def __init__(self, run_dir: Path, cfg: RunConfig, device: torch.device, ema: bool) -> None:
        self.run_dir, self.cfg, self.device, self.ema = run_dir, cfg, device, ema

    def _maybe_raw(self, model: nn.Module) -> nn.Module:
        """``--no-ema``: the live weights from the final checkpoint instead of the EMA copy."""
        if not self.ema:
            state = load_checkpoint(self.run_dir / "checkpoint.pt")
            model.load_state_dict(state["model"])
        return model


class _LDM(_Adapter):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from sparsediff.pipelines import ldm

        self.pipe = ldm
        run = ldm.load_trained(self.run_dir, self.device)
        self.unet = self._maybe_raw(run["unet"]).to(self.device).eval()
        self.ae, self.shape, self.scale = run["ae"], run["shape"], run["scale"]
        self.denoiser = self.unet

    def generate(self, num: int, seed: int, p: Protocol) -> torch.Tensor:
        images = self.pipe.generate(
            self.cfg,
            self.unet,
            self.ae,
            num,
            self.shape,
            self.scale,
            seed,
            p.sampler,
            p.steps,
            p.eta,
        )
        return quantize_images(images).cpu()

    def reference(self, split: str, size: int) -> tuple[torch.Tensor, dict[str, Any]]:
        data = self.pipe.image_dataset(self.cfg, split)
        n = min(size, len(data))
        images = [data[i] for i in range(n)]
        images = torch.stack([im for im in images if im is not None])
        d = self.cfg.data
        ident = {"dataset": d.name, "path": d.path, "max_val": d.max_val}
        return quantize_images(images).cpu(), ident

    def flops(self) -> tuple[Any, float]:
        z = torch.zeros(1, *self.shape, device=self.device)
        t = torch.zeros(1, dtype=torch.long, device=self.device)
        report = inference_flops(self.unet, z, t)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            self.ae.decode(z)
        return report, float(counter.get_total_flops())


class _Chiro(_Adapter):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from sparsediff.pipelines import chirodiff

        self.pipe = chirodiff
        run = chirodiff.load_trained(self.run_dir, self.device)
        self.model = self._maybe_raw(run["model"]).to(self.device).eval()
        self.lengths = run["lengths"]
        self.denoiser = self.model

    def generate(self, num: int, seed: int, p: Protocol) -> torch.Tensor:
        sketches = self.pipe.generate(
            self.cfg, self.model, self.lengths, num, seed, p.sampler, p.steps, p.eta
        )
        return self.pipe.render(self.cfg, sketches)

    def reference(self, split: str, size: int) -> tuple[torch.Tensor, dict[str, Any]]:
        data = self.pipe.stroke_dataset(self.cfg, split)
        n = min(size, len(data))
        sketches = [data.strokes(i) for i in range(n)]
        d = self.cfg.data
        ident = {
            "dataset": d.name,
            "path": d.path,
            "category": d.category,
            "split_seed": d.split_seed,
            "extent": d.extent,
            "resample_step": d.resample_step,
            "max_len": d.max_len,
            "raster": f"{d.raster_size}px-lw{d.raster_line_width}",
        }
        return self.pipe.render(self.cfg, sketches), ident

    def flops(self) -> tuple[Any, float]:
        length = max(1, int(round(float(np.mean(self.lengths)))))
        x = torch.zeros(1, length, 3, device=self.device)
        t = torch.zeros(1, dtype=torch.long, device=self.device)
        lens = torch.tensor([length], device=self.device)
        return inference_flops(self.model, x, t, lens), 0.0


def _versions() -> dict[str, str]:
    out = {}
    for name in ("sparsediff", "torch", "torchmetrics", "diffusers", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _shards(folder: Path) -> dict[tuple[int, int], Path]:
    found = {}
    for path in folder.glob("samples-*-*.safetensors"):
        _, start, stop = path.stem.split("-")
        found[(int(start), int(stop))] = path
    return found


def _covered(shards: dict[tuple[int, int], Path], n: int) -> bool:
    covered = np.zeros(n, dtype=bool)
    for start, stop in shards:
        covered[start:stop] = True
    return bool(covered.all())


def generate_shard(
    adapter: _Adapter, p: Protocol, start: int, stop: int, folder: Path
) -> tuple[Path, float]:
    """Generate samples ``start..stop-1`` in batches; returns the shard path and seconds."""
    chunks = []
    tick = time.perf_counter()
    for i in range(start, stop, p.batch_size):
        num = min(p.batch_size, stop - i)
        chunks.append(adapter.generate(num, p.seed * 1_000_003 + i, p))
    seconds = time.perf_counter() - tick
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"samples-{start}-{stop}.safetensors"
    save_file({"images": torch.cat(chunks).contiguous()}, str(path))
    return path, seconds


def cost_record(adapter: _Adapter, p: Protocol, seconds_per_sample: float | None) -> dict:
    """Parameters and FLOPs of the run, sparse and dense, from the engine's accounting."""
    cfg = adapter.cfg
    total, nonzero = count_parameters(adapter.denoiser)
    report, decode = adapter.flops()
    env = json.loads((adapter.run_dir / "config.json").read_text())["environment"]
    samples_seen = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum
    samples_seen *= int(env.get("world_size", 1))
    method, dt = cfg.sparse.method, cfg.sparse.update_interval
    train_step = training_flops_per_step(report.dense, report.sparse, method, dt)
    return {
        "params_total": total,
        "params_nonzero": nonzero,
        "params_dense_total": total,
        "inference_flops": report.sparse,
        "inference_flops_dense": report.dense,
        "nfe": p.steps,
        "decode_flops": decode,
        "sample_flops": p.steps * report.sparse + decode,
        "sample_flops_dense": p.steps * report.dense + decode,
        "train_flops": train_step * samples_seen,
        "train_flops_dense": 3.0 * report.dense * samples_seen,
        "sampling_seconds_per_sample": seconds_per_sample,
    }


def evaluate_run(
    run_dir: str | Path,
    num_samples: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    ema: bool | None = None,
    seed: int | None = None,
    seed_range: tuple[int, int] | None = None,
    device: str = "auto",
    feature_module: nn.Module | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a finished run; writes and returns ``eval-*.json`` (or a partial record).

    Arguments left as None come from the run's ``eval`` config. ``feature_module`` replaces
    the Inception network (tests use a tiny one); ``cache_dir`` the reference cache.
    """
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    e = cfg.eval
    p = Protocol(
        num_samples=num_samples if num_samples is not None else e.num_samples,
        sampler=sampler or e.sampler,
        steps=steps if steps is not None else e.steps,
        eta=eta if eta is not None else e.eta,
        seed=seed if seed is not None else e.seed,
        ema=ema if ema is not None else e.ema,
        batch_size=e.batch_size,
    )
    if p.num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for FID, got {p.num_samples}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    adapter_cls = _LDM if cfg.pipeline == "ldm" else _Chiro
    adapter = adapter_cls(run_dir, cfg, torch.device(device), p.ema)
    folder = run_dir / "eval" / p.digest()
    start, stop = seed_range if seed_range else (0, p.num_samples)
    if not 0 <= start < stop <= p.num_samples:
        raise ValueError(f"seed range {start}:{stop} must lie within 0:{p.num_samples}")
    if start % p.batch_size:
        raise ValueError(f"seed range start {start} must be a multiple of {p.batch_size}")
    shards = _shards(folder)
    seconds = None
    if (start, stop) not in shards:
        path, elapsed = generate_shard(adapter, p, start, stop, folder)
        shards[(start, stop)] = path
        seconds = elapsed / (stop - start)
    if not _covered(shards, p.num_samples):
        done = sorted(shards)
        return {"partial": True, "protocol": vars(p), "shards": done}

    fake = torch.cat([load_file(str(shards[k]))["images"] for k in sorted(shards)])
    fake = fake[: p.num_samples]
    features = feature_module or InceptionFeatures(e.inception_weights or None)
    net_hash = getattr(features, "weights_sha1", type(features).__name__)
    ref_images, ident = adapter.reference(e.reference_split, e.reference_size)
    key = reference_key(
        ident.pop("dataset"),
        e.reference_split,
        len(ref_images),
        int(ref_images.shape[-1]),
        net_hash,
        **{k: str(v) for k, v in ident.items()},
    )
    cache = ReferenceCache(cache_dir or default_cache_dir())
    real = cache.get_or_compute(
        key, lambda: extract_features(ref_images, features, e.batch_size, device)
    )
    fake_features = extract_features(fake, features, e.batch_size, device)
    metrics = compute_metrics(
        real,
        fake_features,
        kid_subset_size=min(e.kid_subset_size, len(real), len(fake_features)),
        seed=p.seed,
    )
    grid = run_dir / "eval-grid.png"
    save_image_grid(fake[:16], grid)
    record = {
        "metrics": metrics,
        "cost": cost_record(adapter, p, seconds),
        "protocol": {
            **vars(p),
            "reference": {**key, "size": len(ref_images)},
            "feature_network": {
                "name": type(features).__name__,
                "sha1": net_hash,
                "preprocessing": PREPROCESSING_VERSION,
            },
            "device": str(device),
            "versions": _versions(),
        },
        "samples_grid": str(grid),
    }
    name = f"eval-{p.sampler}{p.steps}-eta{p.eta:g}-n{p.num_samples}-seed{p.seed}"
    name += "-ema" if p.ema else "-raw"
    (run_dir / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record
