"""Batched feature extraction from image tensors or iterables of image batches."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .checks import as_uint8_images

Images = Tensor | Iterable[Tensor] | Iterable[tuple[Tensor, ...]]


def _module_device(module: nn.Module) -> torch.device:
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def extract_features(
    images: Images,
    feature_module: nn.Module,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    name: str = "images",
    progress: bool = False,
) -> Tensor:
    """Run ``feature_module`` over one image set and return (N, D) float64 features on CPU.

    ``images`` is a uint8 (N, C, H, W) tensor or an iterable of batches ((N, C, H, W) or
    single (C, H, W) images; a tuple such as a DataLoader's ``(images, labels)`` uses its
    first element). Every image of one set must have the same (C, H, W); two sets may differ
    since the feature module resizes. ``feature_module`` is put in eval mode and moved to
    ``device`` (default: where its parameters already are). ``progress`` shows a bar named
    ``name``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _module_device(feature_module)
    feature_module.to(device).eval()
    batches = [images] if isinstance(images, Tensor) else images
    chunks: list[Tensor] = []
    total = len(images) if isinstance(images, Tensor) else None
    bar = tqdm(total=total, desc=name, unit="image", disable=not progress, dynamic_ncols=True)
    first_shape: tuple[int, ...] | None = None
    for i, batch in enumerate(batches):
        if isinstance(batch, tuple | list):
            batch = batch[0]
        if isinstance(batch, Tensor) and batch.dim() == 3:
            batch = batch.unsqueeze(0)
        batch = as_uint8_images(batch, f"{name} (batch {i})")
        shape = tuple(batch.shape[1:])
        if first_shape is None:
            first_shape = shape
        elif shape != first_shape:
            raise ValueError(
                f"{name}: image size mismatch within one set: batch {i} has (C, H, W)="
                f"{shape}, earlier batches {first_shape}"
            )
        for chunk in batch.split(batch_size):
            with torch.inference_mode():
                feats = feature_module(chunk.to(device))
            if feats.dim() != 2 or feats.shape[0] != chunk.shape[0]:
                raise ValueError(
                    f"feature module returned shape {tuple(feats.shape)} for a batch of "
                    f"{chunk.shape[0]}; expected (N, D)"
                )
            chunks.append(feats.detach().to(device="cpu", dtype=torch.float64))
            bar.update(len(chunk))
    bar.close()
    if not chunks:
        raise ValueError(f"{name}: no images given")
    return torch.cat(chunks)
