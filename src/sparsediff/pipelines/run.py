"""The run skeleton every pipeline shares: train a run, and load a finished one.

A run directory holds ``config.json`` (the resolved config and the environment), the loop's
``metrics.jsonl`` and ``checkpoint.pt``, what the pipeline recorded for sampling, and when
finished ``model.safetensors`` (the EMA denoiser; sparse weights are zeros and it loads into the
plain model class), ``samples.png`` and ``done.json``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparsediff
from sparsediff.config import RunConfig, flatten, read_run_config
from sparsediff.io import read_json, write_json
from sparsediff.models.condense import load_condensed, read_condensed_info
from sparsediff.pipelines.base import Pipeline, sample_seeds
from sparsediff.pipelines.registry import get_pipeline
from sparsediff.training.checkpoint import load_checkpoint
from sparsediff.training.distributed import Dist, barrier, resolve_device, setup
from sparsediff.training.loop import Trainer, seed_stage
from sparsediff.weights import load_weights, save_compact, save_weights

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "model.safetensors"  # the final (EMA) denoiser, loadable into the plain class
COMPACT_WEIGHTS_FILE = "model.compact.safetensors"  # the same, as bit-masks + non-zeros
SAMPLES_FILE = "samples.png"
DONE_FILE = "done.json"


def _git_hash() -> str:
    command, here = ["git", "rev-parse", "--short", "HEAD"], Path(__file__).parent
    try:
        out = subprocess.run(command, capture_output=True, text=True, cwd=here, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def environment(dist: Dist, cfg: RunConfig) -> dict[str, Any]:
    """Facts about the machine and numerics that move results; written with every run."""
    cuda = dist.device.type == "cuda"
    device = torch.cuda.get_device_name(dist.device) if cuda else platform.processor() or "cpu"
    return {
        "sparsediff": sparsediff.__version__,
        "git": _git_hash(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
        "world_size": dist.world_size,
        "precision": cfg.train.precision,
        "tf32": bool(cfg.train.tf32 and cuda),
    }


# What may change when a run is resumed: how it is run and watched, not what it trains.
RESUMABLE_CHANGES = (
    "name",
    "train.progress",
    "train.log_every",
    "train.checkpoint_every",
    "train.sample_every",
    "train.num_workers",
    "train.device",
    "train.threads",
    "train.stop_at",
    "train.tensorboard",
    "sample.",
    "eval.",
)


def is_started(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run (finished or not)."""
    return (Path(run_dir) / CONFIG_FILE).exists()


def _claim_run_dir(
    cfg: RunConfig, run_dir: Path, dist: Dist, resume: bool, overwrite: bool
) -> dict[str, Any]:
    """Check what ``run_dir`` holds against what was asked; returns the config.json record.

    A new run needs an empty place, ``resume`` a started run with the same training settings
    (changes in ``RESUMABLE_CHANGES`` are allowed and recorded), ``overwrite`` starts again.
    """
    record = {"config": cfg.to_dict(), "environment": environment(dist, cfg)}
    if overwrite and is_started(run_dir):
        barrier(dist)
        if dist.is_main:
            shutil.rmtree(run_dir)
        barrier(dist)
    elif resume and not is_started(run_dir):
        raise ValueError(f"nothing to resume: {run_dir} holds no run ({CONFIG_FILE} is missing)")
    elif resume:
        saved = read_json(run_dir / CONFIG_FILE)
        old, new = flatten(saved["config"]), flatten(cfg.to_dict())
        changed = {k: [old.get(k), new.get(k)] for k in old.keys() | new.keys()}
        changed = {k: v for k, v in sorted(changed.items()) if v[0] != v[1]}
        refused = [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]
        if refused:
            lines = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
            raise ValueError(
                f"--resume of {run_dir} with other training settings ({lines}); resume with the "
                "run's own settings, or start a new run (another --run-dir, or --overwrite)"
            )
        entry = {"time": time.time(), "changed": changed, "environment": record["environment"]}
        record = {**saved, "config": cfg.to_dict(), "resumes": [*saved.get("resumes", []), entry]}
    elif is_started(run_dir):
        state = "finished" if (run_dir / DONE_FILE).exists() else "unfinished"
        raise ValueError(
            f"{run_dir} already holds a {state} run: pass --resume to continue it, or "
            "--overwrite to delete it and start again"
        )
    return record


def default_threads() -> int:
    """Half the cores, at most 8: the default does not collapse when a neighbour is busy."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def train(
    cfg: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train a run end to end; returns a summary (also written to ``done.json``).

    ``resume`` continues a started run (from its checkpoints; bit-identical to an uninterrupted
    run), ``overwrite`` deletes what ``run_dir`` holds first; a new run needs an unused place.
    """
    run_dir = Path(run_dir)
    pipeline = get_pipeline(cfg.pipeline)(cfg, run_dir)
    torch.set_num_threads(cfg.train.threads or default_threads())
    dist = setup(cfg.train.device)
    record = _claim_run_dir(cfg, run_dir, dist, resume, overwrite)
    barrier(dist)  # every rank has looked at the directory before rank 0 writes into it
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if dist.is_main:
        write_json(run_dir / CONFIG_FILE, record)
    pipeline.prepare(dist, resume)
    seed_stage(cfg.seed, "denoiser")  # the same initial weights however the stages before ran
    task = pipeline.task()
    grid = pipeline.sampling(cfg.sample)
    seeds = sample_seeds(cfg.seed, 0, cfg.sample.num)
    task.write_grid = lambda model, path: pipeline.save_samples(
        pipeline.generate(model, seeds, grid, progress=False), path
    )
    trainer = Trainer(task, cfg.train, run_dir, dist, seed=cfg.seed, sparse_cfg=cfg.sparse)
    if resume:
        trainer.maybe_resume()
    state = trainer.train()
    summary: dict[str, Any] = {"step": state.step, **pipeline.summary()}
    if state.step >= cfg.train.steps and dist.is_main:
        final = trainer.ema.module if trainer.ema else trainer.model
        save_weights(final, run_dir / WEIGHTS_FILE)
        save_compact(final.state_dict(), run_dir / COMPACT_WEIGHTS_FILE)  # exact, fp32 values
        trainer.write_grid(run_dir / SAMPLES_FILE)
        if trainer.sparse is not None:
            summary["sparse"] = json.loads(json.dumps(trainer.sparse.stats(), default=str))
        write_json(run_dir / DONE_FILE, {"finished": time.time(), **summary})
    barrier(dist)
    return summary


def load_run(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    ema: bool = True,
    cfg: RunConfig | None = None,
) -> tuple[Pipeline, nn.Module]:
    """A finished run's pipeline (ready to generate) and its denoiser on ``device``.

    ``ema=False`` takes the live weights of the final checkpoint instead of the EMA copy. A
    folder written by ``sparsediff condense`` loads the same way (its smaller network).
    ``cfg``: the run's config when the caller has read it already.
    """
    run_dir = Path(run_dir)
    device = torch.device(device)
    cfg = cfg or read_run_config(run_dir)
    condensed = read_condensed_info(run_dir)  # a condensed copy reads its run's frozen parts
    source = Path(condensed["source"]) if condensed else run_dir
    pipeline = get_pipeline(cfg.pipeline)(cfg, source)
    pipeline.load(device)
    denoiser = pipeline.build_denoiser()
    if condensed:
        if not ema:
            raise ValueError(f"{run_dir} holds a condensed EMA denoiser only")
        denoiser = load_condensed(denoiser, run_dir)
    elif ema:
        path = run_dir / WEIGHTS_FILE
        if not path.exists() and (run_dir / COMPACT_WEIGHTS_FILE).exists():
            path = run_dir / COMPACT_WEIGHTS_FILE  # the dense file may be dropped to save space
        try:
            denoiser.load_state_dict(load_weights(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path} is missing: is the run finished?") from None
        except Exception as err:  # safetensors' own error types: truncated or corrupt
            raise ValueError(f"{path}: not readable weights ({err})") from None
    else:
        denoiser.load_state_dict(load_checkpoint(run_dir / CHECKPOINT_FILE)["model"])
    return pipeline, denoiser.to(device).eval()


def write_samples(
    run_dir: str | Path,
    out: str | Path,
    num: int = 16,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
) -> Path:
    """Write a sample grid (and SVGs for sketches) from a finished run's EMA weights.

    Sampler settings left as None come from the run's ``sample`` config.
    """
    pipeline, denoiser = load_run(run_dir, resolve_device(device))
    settings = pipeline.sampling(pipeline.cfg.sample, sampler, steps, eta)
    samples = pipeline.generate(denoiser, sample_seeds(seed, 0, num), settings, progress=progress)
    return pipeline.save_samples(samples, Path(out))
