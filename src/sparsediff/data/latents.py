"""Latent cache: encode an image dataset once with the first stage and reuse it across runs.

The cache is a safetensors file (``latents``: ``(N, C, h, w)``, and ``labels``: ``(N,)`` when the
dataset has class labels, for class-conditional models) whose metadata holds a JSON
record of the encoder fingerprint, the dataset identity, caller-supplied extras and the
latent statistics. A cache whose record differs from the current request is rebuilt.

The cache knows no model: the caller passes an ``encode`` function and a ``fingerprint`` string
identifying the encoder (the Latent Diffusion pipeline passes its autoencoder's encoder and a
hash of its weights).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sparsediff.data.images import collate_skip_none
from sparsediff.io import atomic_write

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: class labels kept beside the latents, when the dataset has them
_META_KEY = "sparsediff_latents"
# Entries of the record that must match for a cache hit; the rest are statistics.
_KEY_FIELDS = ("version", "ae_fingerprint", "dataset", "extra", "dtype")


class LatentDataset(Dataset):
    """In-memory first-stage latents; items are unscaled float32 ``(C, h, w)`` tensors.

    ``latents`` is the whole ``(N, C, h, w)`` tensor in the cache's storage dtype.

    ``scale_factor`` = 1 / std of all latents is LDM's ``scale_by_std`` factor; it is only
    recorded — the caller decides whether to train on ``z * scale_factor`` (and decode
    ``z / scale_factor``) or to keep 1.0 as LDM did for VQ-f4.
    """

    def __init__(
        self,
        latents: torch.Tensor,
        meta: dict[str, Any],
        path: Path | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        self.latents = latents
        self.meta = meta
        self.path = path
        self.labels = labels  # (N,) class labels when the dataset has them

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.latents[index].float()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent ``(C, h, w)``."""
        return tuple(self.latents.shape[1:])

    @property
    def scale_factor(self) -> float:
        """LDM's ``scale_by_std`` factor, 1 / std of all latents."""
        return 1.0 / float(self.meta["std"])


def _dataset_identity(dataset: Dataset) -> dict[str, Any]:
    identity = getattr(dataset, "identity", None)
    if identity is None:
        identity = {"name": type(dataset).__name__, "count": len(dataset)}
    return dict(identity)


def _stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _latent_stats(chunks: list[torch.Tensor]) -> dict[str, Any]:
    """Global and per-channel mean/std, accumulated per chunk in float64 (no full copy)."""
    total = torch.zeros(chunks[0].shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    for z in chunks:
        z = z.double()
        total += z.sum(dim=(0, 2, 3))
        total_sq += z.square().sum(dim=(0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    n_all = count * len(total)
    mean_c, mean = total / count, total.sum() / n_all
    # Unbiased, like LDM's scale_by_std (`z.flatten().std()`).
    var_c = (total_sq - count * mean_c.square()).clamp_min(0) / max(count - 1, 1)
    var = (total_sq.sum() - n_all * mean.square()).clamp_min(0) / max(n_all - 1, 1)
    return {
        "mean": mean.item(),
        "std": var.sqrt().item(),
        "channel_mean": mean_c.tolist(),
        "channel_std": var_c.sqrt().tolist(),
    }


class _Indexed(Dataset):
    """A dataset's items with their indices (None stays None: an unreadable item)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any] | None:
        item = self.dataset[index]
        if isinstance(item, list | tuple):  # (image, label, ...) datasets
            item = item[0]
        return None if item is None else (index, item)


def _encode_all(
    loader: DataLoader,
    encode: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    progress: bool,
    identity: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every readable image's latent, and which items they are."""
    chunks, kept = [], []
    with torch.no_grad():
        for batch in tqdm(loader, disable=not progress, desc="encoding latents"):
            if batch is None:
                continue
            indices, images = batch
            chunks.append(encode(images.to(device)).float().cpu())
            kept.append(indices)
    if not chunks:
        raise ValueError(f"no readable images in dataset {identity}; nothing to encode")
    return torch.cat(chunks), torch.cat(kept)


def _report_skipped(dataset: Dataset, count: int, identity: dict[str, Any]) -> None:
    skipped = len(dataset) - count
    if skipped:
        detail = getattr(dataset, "pop_skipped_report", lambda: None)()
        tqdm.write(
            f"latent cache: skipped {skipped} unreadable image(s) of {len(dataset)} "
            f"while encoding {identity.get('name', 'data')}" + (f" ({detail})" if detail else ""),
            file=sys.stderr,
        )


class LatentCache:
    """Builds or loads cached first-stage latents of a dataset (see :meth:`build_or_load`)."""

    @staticmethod
    def cache_path(cache_dir: str | Path, identity: dict[str, Any]) -> Path:
        """File of a dataset's cache: readable prefix + hash of its identity."""
        name = str(identity.get("name", "data")).replace("/", "_")
        split = identity.get("split", "")
        res = identity.get("resolution", "")
        return (
            Path(cache_dir)
            / f"latents-{name}-{split}-{res}-{_stable_hash(identity)[:10]}.safetensors"
        )

    @staticmethod
    def load(path: str | Path) -> LatentDataset:
        """Load a cache file written by :meth:`build_or_load`."""
        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()[_META_KEY])
            latents = f.get_tensor("latents")
            labels = f.get_tensor("labels") if "labels" in f.keys() else None
        return LatentDataset(latents, meta, path=path, labels=labels)

    @staticmethod
    def _read_record(path: Path) -> dict[str, Any] | None:
        try:
            with safe_open(str(path), framework="pt") as f:
                return json.loads(f.metadata()[_META_KEY])
        except Exception:  # unreadable / foreign file: treat as stale
            return None

    @classmethod
    def build_or_load(
        cls,
        cache_dir: str | Path,
        encode: Callable[[torch.Tensor], torch.Tensor],
        fingerprint: str,
        dataset: Dataset,
        batch_size: int = 64,
        fingerprint_extra: dict[str, Any] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        num_workers: int = 0,
        progress: bool = True,
    ) -> LatentDataset:
        """Return the latents of ``dataset`` under ``encode``, encoding them only when needed.

        ``encode`` maps an image batch (already on ``device``, default CPU) to latents; it runs
        under ``torch.no_grad()`` and should be deterministic (model in eval mode).
        ``fingerprint`` identifies the encoder (e.g. ``autoencoder_fingerprint(ae)``, computed
        once by the caller; the cache never hashes weights). The cache is reused when
        ``fingerprint``, the dataset identity, ``fingerprint_extra`` (e.g. the first-stage
        checkpoint path or preprocessing options) and ``dtype`` match; otherwise it is
        re-encoded in batches and overwritten atomically. Unreadable images are dropped,
        reported (``tqdm.write``) and counted in ``meta["skipped"]``; ``meta`` also records the
        global and per-channel latent mean/std (see :class:`LatentDataset`).
        """
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TypeError(
                "fingerprint must be a non-empty string identifying the encoder "
                f"(e.g. autoencoder_fingerprint(ae)), got {type(fingerprint).__name__}"
            )
        identity = _dataset_identity(dataset)
        key = {
            "version": CACHE_VERSION,
            "ae_fingerprint": fingerprint,
            "dataset": identity,
            "extra": json.loads(json.dumps(fingerprint_extra or {}, sort_keys=True, default=str)),
            "dtype": str(dtype).removeprefix("torch."),
        }
        path = cls.cache_path(cache_dir, identity)
        record = cls._read_record(path) if path.is_file() else None
        if record is not None and all(record.get(k) == key[k] for k in _KEY_FIELDS):
            log.info("loading cached latents from %s", path)
            return cls.load(path)
        if record is not None:
            changed = [k for k in _KEY_FIELDS if record.get(k) != key[k]]
            log.info("latent cache %s is stale (%s differ); re-encoding", path, ", ".join(changed))
        device = torch.device("cpu" if device is None else device)
        loader = DataLoader(
            _Indexed(dataset),
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=collate_skip_none,
        )
        latents, kept = _encode_all(loader, encode, device, progress, identity)
        _report_skipped(dataset, len(kept), identity)
        tensors = {"latents": latents.to(dtype).contiguous()}
        labels = getattr(dataset, "labels", None)  # class labels, kept with their latents
        if labels is not None:
            tensors["labels"] = torch.as_tensor(labels)[kept].long().contiguous()
        meta = {
            **key,
            **_latent_stats(list(latents.split(batch_size))),
            "count": latents.shape[0],
            "skipped": len(dataset) - latents.shape[0],
            "latent_shape": list(latents.shape[1:]),
        }
        metadata = {_META_KEY: json.dumps(meta)}
        # Atomic: a crashed run never leaves a half-written cache under the real name.
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata))
        log.info("cached %d latents %s to %s", latents.shape[0], tuple(latents.shape[1:]), path)
        return cls.load(path)
