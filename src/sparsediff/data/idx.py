"""IDX files, the (Fashion-)MNIST format: the one reader, for raw or gzip-compressed files."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np

# IDX type byte -> element dtype (big-endian on disk).
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzip-compressed or not) into a native-byte-order numpy array.

    The magic number is two zero bytes, the element type (:data:`IDX_DTYPES`; ``0x08`` = uint8)
    and the number of dimensions, e.g. 2051 for (Fashion-)MNIST images (uint8, 3 dims) and 2049
    for labels (uint8, 1 dim). ``expected_magic`` rejects any other magic number. Raises
    ``ValueError`` for a malformed or truncated file.
    """
    path = Path(path)
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX file")
    magic = int.from_bytes(data[:4], "big")
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES or data[3] < 1:
        raise ValueError(f"{path}: bad IDX magic number {magic:#010x}")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    count = math.prod(shape)
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(
            f"{path}: truncated IDX file ({len(data) - offset} of {count * dtype.itemsize} bytes)"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="))
