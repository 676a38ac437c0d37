"""Input checks shared by the feature extractors and the metrics (clear ValueErrors)."""

from __future__ import annotations

import torch
from torch import Tensor


def as_uint8_images(images: Tensor, name: str = "images") -> Tensor:
    """Check an image batch and return it as uint8 (N, C, H, W) with C in {1, 3}.

    uint8 passes through. Other integer dtypes must lie in [0, 255]. Float input is read on
    the 0..255 scale, must be finite and within [0, 255], and is rounded to the nearest
    integer, which is what saving the samples as PNG would do.
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name}: expected shape (N, 1|3, H, W), got {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name}: empty batch {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if images.dtype == torch.bool or images.is_complex():
        raise ValueError(f"{name}: unsupported dtype {images.dtype}; use uint8 in [0, 255]")
    if images.is_floating_point() and not torch.isfinite(images).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    lo, hi = images.min().item(), images.max().item()
    if lo < 0 or hi > 255:
        raise ValueError(
            f"{name}: {images.dtype} values must lie in [0, 255] (uint8 scale), got "
            f"[{lo:g}, {hi:g}]; convert model outputs with sparsediff.imaging.to_uint8()"
        )
    return images.round().to(torch.uint8) if images.is_floating_point() else images.to(torch.uint8)


def check_features(features: Tensor, name: str, min_samples: int = 2) -> Tensor:
    """Check a (N, D) feature matrix (finite, N >= ``min_samples``) and return it as float64."""
    if not isinstance(features, Tensor) or features.dim() != 2:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"{name} features: expected a (N, D) tensor, got {shape}")
    if features.shape[0] < min_samples:
        raise ValueError(
            f"{name} features: need at least {min_samples} samples, got {features.shape[0]}"
        )
    if features.shape[1] == 0:
        raise ValueError(f"{name} features: feature dimension is 0")
    features = features.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} features: contains NaN or infinite values")
    return features


def check_feature_pair(real: Tensor, fake: Tensor, min_samples: int = 2) -> tuple[Tensor, Tensor]:
    """Check both feature sets and that they have the same feature dimension."""
    real = check_features(real, "real", min_samples)
    fake = check_features(fake, "fake", min_samples)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"feature dimensions differ: real has {real.shape[1]}, fake has {fake.shape[1]}"
        )
    return real, fake
