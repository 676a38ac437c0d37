"""What both pipelines do the same way: run directories, resolved configs, grids, exports."""

from __future__ import annotations

import json
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import sparsediff
from sparsediff.config import RunConfig
from sparsediff.metrics.validation import quantize_images
from sparsediff.training.distributed import Dist

WEIGHTS_FILE = "model.safetensors"  # the final (EMA) denoiser, loadable into the plain class
DONE_FILE = "done.json"


def _git_hash() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(dist: Dist, cfg: RunConfig) -> dict[str, Any]:
    """Facts about the machine and numerics that move results; written with every run."""
    cuda = dist.device.type == "cuda"
    return {
        "sparsediff": sparsediff.__version__,
        "git": _git_hash(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(dist.device)
        if cuda
        else platform.processor() or "cpu",
        "world_size": dist.world_size,
        "precision": cfg.train.precision,
        "tf32": bool(cfg.train.tf32 and cuda),
    }


def prepare_run_dir(cfg: RunConfig, run_dir: Path, dist: Dist) -> None:
    """Create the run directory and write the fully resolved config (rank 0)."""
    if dist.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {"config": cfg.to_dict(), "environment": environment(dist, cfg)}
        (run_dir / "config.json").write_text(json.dumps(record, indent=2) + "\n")


def save_image_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write (N, C, H, W) images in [-1, 1] (or uint8) as one PNG grid with 2-pixel gaps."""
    if images.dtype != torch.uint8:
        images = quantize_images(images)
    images = images.cpu()
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    pad = 2
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


def export_weights(model: nn.Module, run_dir: Path) -> Path:
    """Save the denoiser's plain state dict (sparse weights are zeros) as safetensors."""
    path = run_dir / WEIGHTS_FILE
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return path


def load_weights(model: nn.Module, run_dir: Path) -> nn.Module:
    """Load :func:`export_weights` output into a freshly built model."""
    model.load_state_dict(load_file(str(Path(run_dir) / WEIGHTS_FILE)))
    return model


def write_done(run_dir: Path, info: dict[str, Any]) -> None:
    """Mark a run finished (the study runner skips finished runs)."""
    (run_dir / DONE_FILE).write_text(json.dumps({"finished": time.time(), **info}, indent=2))
