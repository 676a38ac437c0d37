"""Shared test fixtures: small data files the tests write themselves."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

_IDX_TYPES = {"u1": 0x08, "i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def write_idx(path: Path, array: np.ndarray, dtype: str = "u1") -> Path:
    """Write an IDX file, the format of (Fashion-)MNIST; gzip-compressed if ``path`` ends in .gz.

    ``dtype`` is the element type as stored (big-endian): u1 (uint8, MNIST), i1, >i2, >i4, >f4,
    >f8. Returns ``path``.
    """
    array = np.asarray(array)
    magic = (_IDX_TYPES[dtype] << 8) | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(dtype).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Fashion-MNIST-shaped dataset: blobs and bars on 28x28, 96 train / 24 test."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 96), ("t10k", 24)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i in range(n):
            y0, x0 = rng.integers(4, 14, size=2)
            images[i, y0 : y0 + 10, x0 : x0 + 6 + i % 5] = 200 + i % 50
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


@pytest.fixture()
def single_thread():
    """One intra-op thread: tiny models stall under OpenMP oversubscription on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
