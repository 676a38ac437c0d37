"""Images as uint8: the one float -> uint8 conversion and the one PNG grid writer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sparsediff.io import atomic_write


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Map float images in ``value_range`` to uint8 (clamped, rounded), like a PNG save.

    NaN/inf raise a ValueError instead of being silently clamped into valid pixels.
    """
    if not images.is_floating_point():
        raise ValueError(f"to_uint8 expects float input, got {images.dtype}")
    if not torch.isfinite(images).all():
        raise ValueError("images: contains NaN or infinite values")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range must be increasing, got {value_range}")
    scaled = (images.to(torch.float32) - lo) * (255.0 / (hi - lo))
    return scaled.clamp(0, 255).round().to(torch.uint8)


def save_image_grid(
    images: torch.Tensor, path: str | Path, nrow: int | None = None, gap: int = 2, fill: int = 0
) -> Path:
    """Write (N, C, H, W) uint8 images, or floats in [-1, 1], as one PNG grid (atomically).

    ``nrow`` images per row (default: a square), ``gap`` pixels of value ``fill`` around each.
    """
    if images.shape[0] == 0:
        raise ValueError("an image grid needs at least one image")
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + gap) + gap, nrow * (w + gap) + gap, c), fill, dtype=np.uint8)
    for i, img in enumerate(images.cpu().permute(0, 2, 3, 1).numpy()):
        r, col = divmod(i, nrow)
        y, x = gap + r * (h + gap), gap + col * (w + gap)
        grid[y : y + h, x : x + w] = img
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
