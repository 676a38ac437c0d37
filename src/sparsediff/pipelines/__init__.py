"""The two diffusion pipelines (Latent Diffusion, ChiroDiff) behind one interface.

``train`` builds a run from a preset and overrides and dispatches on ``cfg.pipeline``;
``sample`` and ``evaluate`` read everything they need from the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsediff.config import RunConfig, load_config, read_run_config


def train_config(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Train a run described by a resolved config."""
    if cfg.pipeline == "ldm":
        from sparsediff.pipelines import ldm

        return ldm.train(cfg, run_dir, resume)
    from sparsediff.pipelines import chirodiff

    return chirodiff.train(cfg, run_dir, resume)


def train(
    preset: str | Path, overrides: dict[str, Any], run_dir: str | Path, resume: bool = False
) -> dict[str, Any]:
    """Train ``preset`` with dotted ``overrides`` into ``run_dir`` (resuming when asked)."""
    return train_config(load_config(preset, overrides), run_dir, resume)


def sample(
    run_dir: str | Path,
    out: str | Path,
    num: int = 16,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """Write a sample grid (and SVGs for sketches) from a finished run's EMA weights.

    Sampler settings left as None come from the run's ``sample`` config.
    """
    cfg = read_run_config(run_dir)
    sampler = sampler or cfg.sample.sampler
    steps = steps if steps is not None else cfg.sample.steps
    eta = eta if eta is not None else cfg.sample.eta
    if cfg.pipeline == "ldm":
        from sparsediff.pipelines import ldm

        return ldm.sample_to_file(run_dir, out, num, sampler, steps, eta, seed, device)
    from sparsediff.pipelines import chirodiff

    return chirodiff.sample_to_file(run_dir, out, num, sampler, steps, eta, seed, device)


def evaluate(run_dir: str | Path, num_samples: int | None = None, seed: int = 0, **kw: Any) -> dict:
    """Run the evaluation protocol on a finished run (see ``sparsediff.metrics.evaluate``)."""
    from sparsediff.metrics.evaluate import evaluate_run

    return evaluate_run(run_dir, num_samples=num_samples, seed=seed, **kw)
