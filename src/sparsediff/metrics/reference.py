"""On-disk cache of reference-set features and statistics (safetensors + JSON, no pickle).

Each entry is ``<digest>.safetensors`` (features, mu, sigma) plus ``<digest>.json`` (the key),
where ``digest`` is the sha1 of the key dict serialised as canonical JSON. The key must name
everything that changes the features: dataset, split, sample count, resolution,
preprocessing version and feature-network hash (see :func:`reference_key`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from sparsediff.io import atomic_write, write_text

from .checks import check_features
from .image_metrics import feature_statistics
from .inception import PREPROCESSING_VERSION


def canonical_key_json(key: dict[str, Any]) -> str:
    """Serialise a key dict deterministically (sorted keys, no whitespace, JSON types only)."""
    if not isinstance(key, dict) or not key:
        raise ValueError("reference key must be a non-empty dict")
    try:
        return json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"reference key must hold only JSON values (str/int/float/...): {err}"
        ) from err


def key_digest(key: dict[str, Any]) -> str:
    """Stable sha1 hex digest of a key dict (independent of key order and process)."""
    return hashlib.sha1(canonical_key_json(key).encode("utf-8")).hexdigest()


def reference_key(
    dataset: str,
    split: str,
    num_images: int,
    resolution: int,
    feature_network_sha1: str,
    preprocessing: str = PREPROCESSING_VERSION,
    **extra: str | int | float | bool | None,
) -> dict[str, Any]:
    """Build the standard key for a reference set; ``extra`` adds e.g. a subset seed."""
    return {
        "dataset": dataset,
        "split": split,
        "num_images": int(num_images),
        "resolution": int(resolution),
        "feature_network_sha1": feature_network_sha1,
        "preprocessing": preprocessing,
        **extra,
    }


class ReferenceCache:
    """Directory of cached reference features keyed by a dict (see module docstring)."""

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        """Use (and create if needed) ``cache_dir``; ``~`` is expanded."""
        self.cache_dir = Path(cache_dir).expanduser()
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def paths(self, key: dict[str, Any]) -> tuple[Path, Path]:
        """Return the (safetensors, json) paths for ``key``."""
        stem = self.cache_dir / key_digest(key)
        return stem.with_suffix(".safetensors"), stem.with_suffix(".json")

    def load(self, key: dict[str, Any]) -> dict[str, Tensor] | None:
        """Return {"features", "mu", "sigma"} (float64) for ``key``, or None on a miss.

        An entry whose stored JSON key differs from ``key`` is treated as a miss.
        """
        tensor_path, json_path = self.paths(key)
        if not (tensor_path.is_file() and json_path.is_file()):
            return None
        stored_key = json.loads(json_path.read_text(encoding="utf-8"))
        if canonical_key_json(stored_key) != canonical_key_json(key):
            return None
        return {name: t.to(torch.float64) for name, t in load_file(tensor_path).items()}

    def store(self, key: dict[str, Any], features: Tensor) -> dict[str, Tensor]:
        """Write features and their mean/covariance for ``key``; return them as float64."""
        features = check_features(features, "reference")
        mu, sigma = feature_statistics(features)
        # Network features are float32: store them as float32 when that is lossless (half size).
        as_f32 = features.to(torch.float32)
        stored = as_f32 if torch.equal(as_f32.to(torch.float64), features) else features
        tensor_path, json_path = self.paths(key)
        key_json = canonical_key_json(key)
        tensors = {"features": stored.contiguous(), "mu": mu, "sigma": sigma}
        atomic_write(tensor_path, lambda p: save_file(tensors, p, metadata={"key": key_json}))
        write_text(json_path, json.dumps(key, indent=2, sort_keys=True))
        return {"features": features, "mu": mu, "sigma": sigma}

    def get_or_compute(self, key: dict[str, Any], compute_fn: Callable[[], Tensor]) -> Tensor:
        """Return cached (N, D) float64 features for ``key``; on a miss call ``compute_fn``."""
        cached = self.load(key)
        if cached is not None:
            return cached["features"]
        return self.store(key, compute_fn())["features"]
