"""Compact sparse weights: a safetensors file with bit-masks and non-zero values.

A sparse run's ``model.safetensors`` stores every masked weight as a zero. The compact format
stores such a tensor as two tensors instead, which is smaller whenever the tensor has enough
zeros (or when the values are cast to 16 bits):

* ``NAME::mask`` — uint8, the flattened (row-major) tensor's ``!= 0`` pattern packed 8 entries
  per byte with :func:`numpy.packbits` (big bit order: entry ``i`` is bit ``7 - i % 8`` of byte
  ``i // 8``; the last byte is zero-padded);
* ``NAME::values`` — 1-D, the non-zero entries in that order, in the tensor's dtype or the
  file's value dtype.

Every other tensor is stored under its own name as it is. The safetensors metadata key
``sparsediff.compact`` holds JSON: ``format`` (``"sparsediff-compact"``), ``version``,
``value_dtype`` (``null`` = each tensor's own dtype) and ``packed`` (name → ``shape``,
``dtype`` of each packed tensor).

Round trip: :func:`load_compact` gives back the dense state dict, equal by value
(``torch.equal``) when ``value_dtype`` is None. The mask is of non-zero entries, so a weight
that is exactly ``0.0`` (or ``-0.0``) comes back as ``+0.0`` whether it was masked or not: the
same value, and what the plain model computes with. A 16-bit ``value_dtype`` is lossy: values
are rounded to fp16/bf16 and cast back to the original dtype on loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from sparsediff.io import atomic_write

FORMAT = "sparsediff-compact"
FORMAT_VERSION = 1
METADATA_KEY = "sparsediff.compact"
MASK_SUFFIX = "::mask"
VALUES_SUFFIX = "::values"
# Two extra header entries (~100 bytes each) per packed tensor: tensors that would save less
# than this stay plain, which keeps biases and norms as they are.
PACK_OVERHEAD_BYTES = 256

_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(value_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``, a torch float dtype, or a name (fp32, fp16, bf16, float16, ...)."""
    if value_dtype is None or isinstance(value_dtype, torch.dtype):
        if value_dtype is not None and not value_dtype.is_floating_point:
            raise ValueError(f"value dtype must be a float dtype, got {value_dtype}")
        return value_dtype
    if value_dtype not in _DTYPE_NAMES:
        raise ValueError(f"unknown value dtype {value_dtype!r}; expected one of {_DTYPE_NAMES}")
    return _DTYPE_NAMES[value_dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _value_dtype(t: torch.Tensor, value_dtype: torch.dtype | None) -> torch.dtype:
    return value_dtype if value_dtype is not None else t.dtype


def _worth_packing(t: torch.Tensor, value_dtype: torch.dtype | None) -> bool:
    if not t.is_floating_point():
        return False
    nonzero = int(torch.count_nonzero(t))
    packed = (t.numel() + 7) // 8 + nonzero * _value_dtype(t, value_dtype).itemsize
    return packed + PACK_OVERHEAD_BYTES < t.numel() * t.element_size()


def pack_tensor(
    t: torch.Tensor, value_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, values)``: the packed ``!= 0`` bit-mask (uint8) and the non-zero entries."""
    flat = t.detach().cpu().reshape(-1)
    nonzero = flat != 0
    mask = torch.from_numpy(np.packbits(nonzero.numpy()))
    values = flat[nonzero].to(_value_dtype(t, value_dtype)).contiguous()
    return mask, values


def unpack_tensor(
    mask: torch.Tensor, values: torch.Tensor, shape: list[int] | tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """The dense tensor of ``shape`` and ``dtype`` from :func:`pack_tensor`'s output."""
    numel = int(np.prod(shape, dtype=np.int64))
    nonzero = torch.from_numpy(np.unpackbits(mask.numpy(), count=numel).astype(bool))
    if int(nonzero.sum()) != values.numel():
        raise ValueError(f"mask has {int(nonzero.sum())} set bits but {values.numel()} values")
    dense = torch.zeros(numel, dtype=dtype)
    dense[nonzero] = values.to(dtype)
    return dense.reshape(shape)


def save_weights(model: nn.Module, path: str | Path) -> Path:
    """A model's plain state dict (sparse weights are zeros) as safetensors, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def save_compact(
    state_dict: dict[str, torch.Tensor],
    path: str | Path,
    value_dtype: str | torch.dtype | None = None,
) -> Path:
    """Write ``state_dict`` in the compact format (atomically); returns ``path``.

    Float tensors are packed when that saves space; ``value_dtype`` (fp16/bf16, lossy) casts
    the packed values. Other tensors are stored as they are.
    """
    value_dtype = parse_dtype(value_dtype)
    tensors: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, Any]] = {}
    for name, t in state_dict.items():
        if name.endswith((MASK_SUFFIX, VALUES_SUFFIX)):
            raise ValueError(f"tensor name {name!r} ends with a reserved suffix")
        t = t.detach().cpu()
        if _worth_packing(t, value_dtype):
            tensors[name + MASK_SUFFIX], tensors[name + VALUES_SUFFIX] = pack_tensor(t, value_dtype)
            packed[name] = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        else:
            tensors[name] = t.contiguous()
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "value_dtype": _dtype_name(value_dtype) if value_dtype is not None else None,
        "packed": packed,
    }
    metadata = {METADATA_KEY: json.dumps(info, separators=(",", ":"))}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def compact_info(path: str | Path) -> dict[str, Any] | None:
    """The compact format's metadata of a safetensors file, or None for a plain file."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if METADATA_KEY not in metadata:
        return None
    info = json.loads(metadata[METADATA_KEY])
    if info.get("format") != FORMAT or int(info.get("version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: unsupported compact weights {info.get('format')!r} "
            f"version {info.get('version')!r} (this reader: {FORMAT_VERSION})"
        )
    return info


def load_compact(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a compact file (on the CPU)."""
    info = compact_info(path)
    if info is None:
        raise ValueError(f"{path} is a plain safetensors file, not compact weights")
    stored = load_file(str(path))
    out: dict[str, torch.Tensor] = {}
    for name, meta in info["packed"].items():
        mask, values = stored.pop(name + MASK_SUFFIX), stored.pop(name + VALUES_SUFFIX)
        out[name] = unpack_tensor(mask, values, meta["shape"], getattr(torch, meta["dtype"]))
    out.update(stored)
    return out


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a plain or a compact safetensors file (told apart by the metadata)."""
    if compact_info(path) is not None:
        return load_compact(path)
    return load_file(str(path))


def _header(path: str | Path) -> dict[str, Any]:
    # safetensors: an 8-byte little-endian header length, then the JSON header
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(size))


def compact_size_report(path: str | Path, dense_path: str | Path | None = None) -> dict[str, Any]:
    """Bytes of the compact file against the dense one, and what was packed.

    ``dense_bytes`` is the size of ``dense_path`` when given, else the dense tensors' data
    (elements × bytes at their original dtype, no header).
    """
    info = compact_info(path)
    if info is None:
        raise ValueError(f"{path} is a plain safetensors file, not compact weights")
    plain = {
        name: entry["data_offsets"][1] - entry["data_offsets"][0]
        for name, entry in _header(path).items()
        if name != "__metadata__" and not name.endswith((MASK_SUFFIX, VALUES_SUFFIX))
    }
    if dense_path is not None:
        dense_bytes = Path(dense_path).stat().st_size
    else:
        dense_bytes = sum(plain.values())
        for meta in info["packed"].values():
            itemsize = torch.empty((), dtype=getattr(torch, meta["dtype"])).element_size()
            dense_bytes += int(np.prod(meta["shape"], dtype=np.int64)) * itemsize
    compact_bytes = Path(path).stat().st_size
    return {
        "compact_bytes": compact_bytes,
        "dense_bytes": dense_bytes,
        "ratio": compact_bytes / dense_bytes,
        "packed_tensors": len(info["packed"]),
        "plain_tensors": len(plain),
        "value_dtype": info["value_dtype"],
    }
