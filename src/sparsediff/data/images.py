"""Image datasets: folders of images (CelebA-HQ, LSUN-Bedrooms, Imagenette) and Fashion-MNIST.

Items are float tensors ``(C, H, W)`` in [-1, 1]. Unreadable images yield ``None`` (drop them with
:func:`collate_skip_none`) and are reported once per epoch by ``pop_skipped_report()``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from sparsediff.data.idx import read_idx
from sparsediff.data.splits import seeded_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

DATASET_HELP: dict[str, str] = {
    "celebahq": (
        "CelebA-HQ 256x256 images, e.g. from the CelebAMask-HQ release (CelebA-HQ-img/, resized "
        "to 256x256) or following the taming-transformers CelebA-HQ instructions. Layout: one "
        "folder of .jpg/.png files (subfolders are scanned recursively)."
    ),
    "lsun-bedrooms": (
        "LSUN bedroom_train: download the lmdb with the LSUN tools (github.com/fyu/lsun, "
        "download.py -c bedroom) and export it to images (python data.py export "
        "bedroom_train_lmdb --out_dir DIR), or use the Kaggle 'lsun-bedroom' sample. Layout: a "
        "folder tree of .jpg/.webp files."
    ),
    "imagenette": (
        "fast.ai Imagenette: download imagenette2.tgz (or imagenette2-320.tgz) from "
        "github.com/fastai/imagenette and extract it. Layout: DIR/train/<class>/*.JPEG and "
        "DIR/val/<class>/*.JPEG."
    ),
    "folder": "Any folder tree of .jpg/.jpeg/.png/.webp images.",
}

_VAL_NAMES = ("val", "valid", "validation", "test")


def _missing_path_error(name: str, path: Path) -> FileNotFoundError:
    help_text = DATASET_HELP.get(name, DATASET_HELP["folder"])
    return FileNotFoundError(
        f"{name} dataset not found at {path}. {help_text} Set the config key `data.path` to "
        "that folder."
    )


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W[, C])`` → float ``(C, H, W)`` in [-1, 1]."""
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """Read an image as RGB, centre-crop to a square and resize (bicubic, antialiased)."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        if side != resolution:
            # PIL widens the filter support when downsampling, i.e. it antialiases.
            img = img.resize((resolution, resolution), Image.Resampling.BICUBIC)
        return _to_tensor(np.asarray(img, dtype=np.uint8))


def collate_skip_none(batch: Sequence[Any]) -> Any:
    """``default_collate`` after dropping ``None`` items; ``None`` if the whole batch is bad."""
    kept = [item for item in batch if item is not None]
    if not kept:
        return None
    return default_collate(kept)


class _SkipReportMixin:
    """Bookkeeping of unreadable files for the end-of-epoch report, and the dataset identity."""

    bad_files: set[str]
    _reported: set[str]
    name: str
    root: Path
    resolution: int
    split: str

    @property
    def identity(self) -> dict[str, Any]:
        """What defines the dataset's content (for cache keys and run metadata)."""
        return {
            "name": self.name,
            "path": str(self.root.resolve()),
            "resolution": self.resolution,
            "split": self.split,
            "count": len(self),
        }

    def pop_skipped_report(self) -> str | None:
        """Describe files skipped since the last call (``None`` if there were none).

        With ``DataLoader(num_workers > 0)`` files are recorded in the worker copies of the
        dataset, so only skips seen in the main process are reported.
        """
        new = sorted(self.bad_files - self._reported)
        if not new:
            return None
        self._reported.update(new)
        shown = ", ".join(new[:5]) + (", ..." if len(new) > 5 else "")
        return f"skipped {len(new)} unreadable image(s) ({len(self.bad_files)} in total): {shown}"


def _read_split_file(split_file: Path, split: str) -> list[str]:
    """Relative paths of ``split`` from a JSON ``{"train": [...], "val": [...]}`` or a text file.

    A text file lists the paths of one split, one per line; ``{split}`` in its name is replaced.
    """
    split_file = Path(str(split_file).replace("{split}", split))
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}")
    if split_file.suffix == ".json":
        splits = json.loads(split_file.read_text())
        key = next((k for k in (split, *_VAL_NAMES) if k in splits and _same(k, split)), None)
        if key is None:
            raise KeyError(f"split {split!r} not in {split_file} (has {sorted(splits)})")
        return list(splits[key])
    lines = split_file.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _same(a: str, b: str) -> bool:
    return a == b or (a in _VAL_NAMES and b in _VAL_NAMES)


def _split_files(
    files: Sequence[str],
    split: str,
    max_train: int | None,
    max_val: int | None,
    seed: int,
) -> list[str]:
    """Files of ``split`` from a :func:`~sparsediff.data.splits.seeded_split` of ``files``.

    Train = the first ``max_train`` shuffled files, val = the next ``max_val`` (in shuffled
    order). ``max_train=None`` leaves ``max_val`` (or 0) files for val; ``max_val=None`` gives
    val the remainder. ``split="all"`` returns ``files`` unchanged.
    """
    if split == "all":
        return list(files)
    if split == "train":
        part = 0
    elif split in _VAL_NAMES:
        part = 1
    else:
        raise ValueError(f"unknown split {split!r}; expected 'train', 'val' or 'all'")
    n_train = len(files) - (max_val or 0) if max_train is None else min(max_train, len(files))
    sizes = (max(n_train, 0), max_val)
    return [files[i] for i in seeded_split(len(files), sizes, part, seed)]


class ImageFolderDataset(_SkipReportMixin, Dataset):
    """Recursively scanned image folder, centre-cropped and resized to ``resolution``.

    Splits come from ``split_file`` (see :func:`_read_split_file`) or from a seeded shuffle
    (:func:`_split_files`), which reproduces the study's subsets, e.g. CelebA-HQ
    ``max_train=12500, max_val=500`` and LSUN-Bedrooms ``max_train=10598, max_val=2500``.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        split: str = "train",
        max_train: int | None = None,
        max_val: int | None = None,
        split_seed: int = 0,
        split_file: str | Path | None = None,
        name: str = "folder",
    ) -> None:
        self.root = Path(root).expanduser()
        self.resolution = int(resolution)
        self.split = split
        self.name = name
        self.bad_files = set()
        self._reported = set()
        if not self.root.is_dir():
            raise _missing_path_error(name, self.root)
        if split_file is not None:
            self.files = [str(self.root / rel) for rel in _read_split_file(Path(split_file), split)]
        else:
            files = sorted(
                str(p)
                for p in self.root.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            self.files = _split_files(files, split, max_train, max_val, split_seed)
        if not self.files:
            raise ValueError(
                f"no images for split {split!r} under {self.root} "
                f"(extensions {', '.join(IMAGE_EXTENSIONS)}). {DATASET_HELP.get(name, '')}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        path = self.files[index]
        try:
            return load_image(path, self.resolution)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            # PIL raises OSError for truncated/corrupt data, SyntaxError for some bad headers.
            self.bad_files.add(path)
            return None


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install it with "
        "`apt-get install dataset-fashion-mnist` (files land in "
        f"{FASHION_MNIST_DIR}) or set `data.path` to a directory holding the four IDX files "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte; .gz or raw)."
    )


# Fashion-MNIST's ten labels, by label number (its README)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class FashionMNIST(_SkipReportMixin, Dataset):
    """Fashion-MNIST from its IDX files: 1×``pad_to``×``pad_to`` float images in [-1, 1].

    The 28×28 images are zero-padded (background) to ``pad_to`` (32, a multiple of the f4
    autoencoder's factor). ``split`` is ``"train"`` (60 k) or ``"test"`` (10 k, alias ``"val"``);
    ``max_items`` keeps the first items.
    """

    def __init__(
        self,
        root: str | Path = FASHION_MNIST_DIR,
        split: str = "train",
        pad_to: int = 32,
        max_items: int | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if split not in ("train", *_VAL_NAMES):
            raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected 'train' or 'test'")
        self.split = split
        self.name = "fashion-mnist"
        self.bad_files = set()
        self._reported = set()
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(_find_idx(self.root, f"{prefix}-images-idx3-ubyte"), 2051)
        labels = read_idx(_find_idx(self.root, f"{prefix}-labels-idx1-ubyte"), 2049)
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(f"{self.root}: images {images.shape} and labels {labels.shape} differ")
        if max_items is not None:
            images, labels = images[:max_items], labels[:max_items]
        h, w = images.shape[1:]
        if pad_to < max(h, w):
            raise ValueError(f"pad_to={pad_to} is smaller than the {h}x{w} images")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        padded = np.zeros((len(images), pad_to, pad_to), dtype=np.uint8)
        padded[:, top : top + h, left : left + w] = images
        self.images = padded
        self.labels = labels.astype(np.int64)
        self.resolution = pad_to
        if len(self.images) == 0:
            raise ValueError(f"Fashion-MNIST {split} split at {self.root} is empty")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return _to_tensor(self.images[index])


DATASET_NAMES = ("fashion-mnist", "celebahq", "lsun-bedrooms", "imagenette", "folder")


def build_image_dataset(
    name: str, path: str | None, resolution: int, split: str = "train", **kw: Any
) -> Dataset:
    """Dataset factory for ``name`` in :data:`DATASET_NAMES`.

    ``fashion-mnist`` (default path: the Debian package folder) pads to ``resolution`` and keeps
    the first ``max_train`` / ``max_val`` images of its own train / test files; the folder
    datasets take :class:`ImageFolderDataset` keywords. Imagenette uses its own ``train/`` and
    ``val/`` folders; ``max_train`` / ``max_val`` cap them (seeded).
    """
    if name == "fashion-mnist":
        cap = kw.get("max_train" if split == "train" else "max_val")
        return FashionMNIST(path or FASHION_MNIST_DIR, split, pad_to=resolution, max_items=cap)
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASET_NAMES}")
    if path is None:
        raise _missing_path_error(name, Path("<data.path unset>"))
    root = Path(path).expanduser()
    if name == "imagenette" and kw.get("split_file") is None:
        folder = "train" if split == "train" else "val"
        if not (root / folder).is_dir():
            raise _missing_path_error(name, root / folder)
        cap = kw.pop("max_train" if split == "train" else "max_val", None)
        kw.pop("max_train", None)
        kw.pop("max_val", None)
        dataset = ImageFolderDataset(
            root / folder, resolution, "train", max_train=cap, max_val=0, name=name, **kw
        )
        dataset.split = split  # the seeded cap used "train" semantics on the split's own folder
        # its class folders (ImageNet ids) in sorted order are the labels 0..9
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        dataset.labels = np.array([classes.index(Path(f).parent.name) for f in dataset.files])
        return dataset
    return ImageFolderDataset(root, resolution, split, name=name, **kw)
