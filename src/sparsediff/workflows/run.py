"""The run skeleton every pipeline shares: train a run, and load a finished one.

A run directory holds ``config.json`` (the resolved config and the environment), the loop's
``metrics.jsonl`` and ``checkpoint.pt``, what the pipeline recorded for sampling, and when
finished ``model.safetensors`` (the EMA denoiser; sparse weights are zeros and it loads into the
plain model class), ``samples.png`` and ``done.json``.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparsediff
from sparsediff.config import RunConfig, flatten
from sparsediff.folders import RUN_ENTRIES, SAMPLE_ENTRIES, check_only_ours, clear, is_run, matches
from sparsediff.io import read_json, write_json
from sparsediff.locks import hold
from sparsediff.models.condense import CONDENSED_ENTRIES, load_condensed, read_condensed_info
from sparsediff.pipelines import PIPELINES, Pipeline, get_pipeline, read_run_config, sample_seeds
from sparsediff.runtime import available_memory, resolve_device, set_threads
from sparsediff.training.checkpoint import load_checkpoint
from sparsediff.training.distributed import Dist, barrier, setup
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


def run_entries() -> tuple[str, ...]:
    """What a run directory of any pipeline may hold: all that ``--overwrite`` may delete."""
    return RUN_ENTRIES + tuple(e for p in PIPELINES.values() for e in p.run_entries)


def _check_resume(cfg: RunConfig, run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """The config.json record of a resumed run; refuses other training settings."""
    saved = read_json(run_dir / CONFIG_FILE)
    old, new = flatten(saved["config"]), flatten(cfg.to_dict())
    # keys only one side has: a newer version added them (at their defaults) or dropped them
    # (another pipeline's sections of the one old schema): not a change of what is trained
    changed = {k: [old[k], new[k]] for k in old.keys() & new.keys()}
    changed = {k: v for k, v in sorted(changed.items()) if v[0] != v[1]}
    refused = [k for k in changed if not k.startswith(RESUMABLE_CHANGES)]
    if refused:
        lines = "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise ValueError(
            f"--resume of {run_dir} with other training settings ({lines}); resume with the "
            "run's own settings, or start a new run (another --run-dir, or --overwrite)"
        )
    for leftover in run_dir.rglob(".*.tmp"):  # atomic writes a kill cut short
        leftover.unlink()
    entry = {"time": time.time(), "changed": changed, "environment": record["environment"]}
    return {**saved, "config": cfg.to_dict(), "resumes": [*saved.get("resumes", []), entry]}


def _claim_run_dir(
    cfg: RunConfig, run_dir: Path, dist: Dist, resume: bool, overwrite: bool
) -> dict[str, Any]:
    """Check what ``run_dir`` holds against what was asked; returns the config.json record.

    A new run needs a place holding nothing but a run's own files, ``resume`` a started run
    with the same training settings (changes in ``RESUMABLE_CHANGES`` are allowed and
    recorded), ``overwrite`` deletes a run's files and starts again: it refuses a folder that
    holds anything else (docs/guarantees.md).
    """
    record = {"config": cfg.to_dict(), "environment": environment(dist, cfg)}
    _check_place(run_dir)
    started = is_started(run_dir)
    if overwrite:
        barrier(dist)
        if dist.is_main:
            clear(run_dir, run_entries(), "--overwrite")
        barrier(dist)
    elif resume and not started:
        raise ValueError(f"nothing to resume: {run_dir} holds no run ({CONFIG_FILE} is missing)")
    elif resume:
        record = _check_resume(cfg, run_dir, record)
    elif started:
        state = "finished" if (run_dir / DONE_FILE).exists() else "unfinished"
        raise ValueError(
            f"{run_dir} already holds a {state} run: pass --resume to continue it, or "
            "--overwrite to delete it and start again"
        )
    return record


def _check_place(run_dir: Path) -> None:
    """Refuse a folder that is not a run and holds more than a run's own files."""
    if not is_started(run_dir):
        check_only_ours(run_dir, run_entries(), "to start a run in it")
    elif not is_run(run_dir):
        raise ValueError(
            f"{run_dir / CONFIG_FILE} is not a run's record: {run_dir} is not a run directory; "
            "choose another folder"
        )


def train(
    cfg: RunConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train a run end to end; returns a summary (also written to ``done.json``).

    ``resume`` continues a started run (from its checkpoints; bit-identical to an uninterrupted
    run), ``overwrite`` deletes what a run wrote in ``run_dir`` first; a new run needs an unused
    place. The run directory is locked while training: a second writer fails at once.
    """
    run_dir = Path(run_dir)
    pipeline = get_pipeline(cfg.pipeline)(cfg, run_dir)
    set_threads(cfg.train.threads)
    dist = setup(cfg.train.device)
    _check_place(run_dir)  # before the lock: a folder of someone else's gets no lock file
    with hold(run_dir) if dist.is_main else nullcontext():
        return _train(cfg, pipeline, run_dir, dist, resume, overwrite)


def _train(
    cfg: RunConfig, pipeline: Pipeline, run_dir: Path, dist: Dist, resume: bool, overwrite: bool
) -> dict[str, Any]:
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


def _check_sample_out(out: Path, run_dir: Path) -> None:
    """A grid is a PNG, and never lands on a file of the run it is drawn from."""
    if out.suffix.lower() != ".png" or out.is_dir():
        raise ValueError(f"--out {out}: a sample grid is a PNG file; give a path ending in .png")
    target, run = out.resolve(), run_dir.resolve()
    if not target.is_relative_to(run):
        return
    parts = target.relative_to(run).parts
    names = [parts[0]] + ([f"{out.stem}-svg"] if len(parts) == 1 else [])  # sketches add SVGs
    own = (*run_entries(), *CONDENSED_ENTRIES)
    for name in names:
        if matches(name, own) and not matches(name, SAMPLE_ENTRIES):
            raise ValueError(
                f"--out {out} would write over the run's own {name}: choose another name"
            )


def _check_fits(pipeline: Pipeline, first: Any, num: int) -> None:
    """Refuse a grid that would not fit in memory, judged from its first batch."""
    n = len(first)
    per_sample = 3 * pipeline.to_images(first).nbytes / n  # images, the grid, PIL's copy
    per_sample += first.nbytes / n if isinstance(first, torch.Tensor) else 0
    need, have = per_sample * num, available_memory()
    if need > 0.8 * have:
        raise ValueError(
            f"--num {num}: a grid of {num:,} samples needs about {need / 2**30:.1f} GiB of "
            f"memory, more than the {have / 2**30:.1f} GiB available; sample fewer (sparsediff "
            "evaluate writes many samples to disk in shards)"
        )


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

    Sampler settings left as None come from the run's ``sample`` config. Samples are drawn in
    batches of ``eval.batch_size`` (each from its own seed: the batch changes nothing); a grid
    that would not fit in memory is refused after the first batch.
    """
    run_dir, out = Path(run_dir), Path(out)
    if num < 1:
        raise ValueError(f"--num {num}: sample at least one")
    _check_sample_out(out, run_dir)
    out = out.resolve()  # written where it was checked, whatever links lie on the way
    with hold(run_dir, shared=True):
        pipeline, denoiser = load_run(run_dir, resolve_device(device))
        settings = pipeline.sampling(pipeline.cfg.sample, sampler, steps, eta)
        batch, chunks = pipeline.cfg.eval.batch_size, []
        for start in range(0, num, batch):
            seeds = sample_seeds(seed, start, min(start + batch, num))
            chunks.append(pipeline.generate(denoiser, seeds, settings, progress=progress))
            if start == 0 and num > len(seeds):
                _check_fits(pipeline, chunks[0], num)
        if isinstance(chunks[0], torch.Tensor):
            samples = torch.cat(chunks)
        else:
            samples = [sample for chunk in chunks for sample in chunk]
        return pipeline.save_samples(samples, out)
