"""Rows of a layer: which are dead, and a layer that computes only its live rows (with the
constant a dead row still outputs, through a following convolution too)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


# ---------------------------------------------------------------------- what is dead
def live_rows(weight: torch.Tensor) -> list[int]:
    """Rows of ``weight`` with a non-zero entry (at least one row: keeping a dead row is exact)."""
    alive = weight.detach().reshape(weight.shape[0], -1).ne(0).any(dim=1)
    rows = alive.nonzero().flatten().tolist()
    return rows or [0]


def head_rows(weight: torch.Tensor, heads: int) -> list[int]:
    """Live rows of each head, every head padded with dead rows to the widest head's count."""
    width = weight.shape[0] // heads
    alive = weight.detach().reshape(weight.shape[0], -1).ne(0).any(dim=1).view(heads, width)
    keep = max(1, int(alive.sum(dim=1).max()))
    rows = []
    for h in range(heads):
        # live rows first, then the lowest dead ones; sorted so heads keep their channel order
        order = sorted(range(width), key=lambda j: (not bool(alive[h, j]), j))[:keep]
        rows += [h * width + j for j in sorted(order)]
    return rows


def index_of(rows: Sequence[int]) -> torch.Tensor:
    """Row numbers as an index tensor."""
    return torch.as_tensor(list(rows), dtype=torch.long)


def complement(rows: Sequence[int], size: int) -> list[int]:
    """The rows of ``range(size)`` not in ``rows``, in order."""
    kept = set(rows)
    return [i for i in range(size) if i not in kept]


def bias_of(layer: nn.Module) -> torch.Tensor:
    """The layer's bias, or zeros: what each of its dead rows outputs. Not detached: under
    :func:`condense`'s ``no_grad`` it is a plain tensor, in condensed training it carries the
    gradient back to the layer."""
    if layer.bias is not None:
        return layer.bias
    return layer.weight.new_zeros(layer.weight.shape[0])


def layer_slice(
    layer: nn.Module,
    rows: torch.Tensor,
    cols: torch.Tensor | None = None,
    bias: bool = True,
    prefix: str = "",
) -> dict[str, torch.Tensor]:
    """``rows`` (and input ``cols``) of a Linear/Conv's weight and bias, by name."""
    weight = layer.weight.index_select(0, rows)  # index_select: the fastest gather here
    out = {f"{prefix}weight": weight if cols is None else weight.index_select(1, cols)}
    if bias:
        out[f"{prefix}bias"] = bias_of(layer).index_select(0, rows)
    return out


def sliced(
    layer: nn.Module, rows: Sequence[int], cols: Sequence[int] | None = None, bias: bool = True
) -> nn.Module:
    """A copy of a Linear/Conv with only ``rows`` (and input ``cols``) of its weight."""
    new = copy.copy(layer)  # its settings; its own tensor tables (not a copy of the tensors)
    new._parameters, new._buffers = dict(layer._parameters), dict(layer._buffers)
    values = layer_slice(layer, index_of(rows), None if cols is None else index_of(cols), bias)
    weight = values["weight"].detach().clone()
    new.weight = nn.Parameter(weight)
    new.bias = nn.Parameter(values["bias"].detach().clone()) if bias else None
    if isinstance(new, nn.Linear):
        new.out_features, new.in_features = weight.shape[0], weight.shape[1]
    else:
        new.out_channels, new.in_channels = weight.shape[0], weight.shape[1]
    return new


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with their names under ``prefix`` (a submodule's path, dot included)."""
    return {prefix + name: t for name, t in tensors.items()}


class Derived(nn.Module):
    """A condensed module whose every parameter is a function of its source module's.

    :meth:`tensors` computes them from the source (the module it replaces, in the plain
    model) with torch operations: at construction, under ``no_grad``, they become the
    module's own copies; in condensed training (``sparsediff.training.condensed``) they are
    computed again at every step from the live full-width parameters, so gradients flow back
    to those and the optimizer, EMA and masks never see the condensed network. Row indices are
    kept as non-persistent buffers (``ix_*``) so that a step gathers on the device.
    """

    def _index(self, name: str, rows: Sequence[int]) -> torch.Tensor:
        self.register_buffer(f"ix_{name}", index_of(rows), persistent=False)
        return getattr(self, f"ix_{name}")

    def _own(self, tensors: dict[str, torch.Tensor], buffers: Sequence[str] = ()) -> None:
        """Take ``tensors`` (from :meth:`tensors`) as this module's parameters, or buffers
        (persistent: saved with the weights) for the names in ``buffers``."""
        for name, t in tensors.items():
            owner, _, attr = name.rpartition(".")
            module = self.get_submodule(owner) if owner else self
            value = t.detach().clone()
            if name in buffers:
                module.register_buffer(attr, value)
            else:
                setattr(module, attr, nn.Parameter(value))

    def tensors(self, *sources: Any) -> dict[str, torch.Tensor]:
        """Every derived tensor of this module, by name, from its source module(s)."""
        raise NotImplementedError


def add_rows(out: torch.Tensor, dim: int, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out[rows] += y`` along ``dim``, in place (a plain add when every row is live)."""
    if rows.numel() == out.shape[dim]:
        return out.add_(y)
    return out.index_add_(dim, rows, y)


def rows_plus(
    y: torch.Tensor, dim: int, rows: torch.Tensor, constant: torch.Tensor
) -> torch.Tensor:
    """A full-width tensor: ``constant`` (per row) everywhere, plus ``y`` at ``rows``."""
    view = [1] * y.dim()
    view[dim] = -1
    constant = constant.to(y.dtype).view(view)
    if rows.numel() == constant.numel():
        return y + constant
    shape = list(y.shape)
    shape[dim] = constant.numel()
    return constant.expand(shape).clone().index_add_(dim, rows, y)


# ---------------------------------------------------------------------- rewrites
class RowSparse(Derived):
    """A Linear or Conv that computes only its live output rows; dead rows output their bias."""

    def __init__(self, layer: nn.Module, rows: Sequence[int]) -> None:
        super().__init__()
        self.layer = sliced(layer, rows, bias=False)
        self.register_buffer("rows", index_of(rows), persistent=False)
        self.dim = -1 if isinstance(layer, nn.Linear) else 1
        self._own(self.tensors(layer))

    def tensors(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The live rows' weights; the bias of all rows (the dead ones' outputs)."""
        return {"layer.weight": layer.weight[self.rows], "bias": bias_of(layer)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output at full width."""
        return rows_plus(self.layer(x), self.dim, self.rows, self.bias)


def _taps(
    size: int, out: int, kernel: int, stride: int, padding: int, dilation: int, device: Any
) -> torch.Tensor:
    """``(out, kernel)``: True where kernel tap ``i`` of output position ``y`` is in the input."""
    pos = torch.arange(out, device=device)[:, None] * stride - padding
    pos = pos + torch.arange(kernel, device=device)[None, :] * dilation
    return (pos >= 0) & (pos < size)


@functools.lru_cache(maxsize=64)
def _inside(
    size: tuple[int, ...], out: tuple[int, ...], conv: tuple, device: Any, dtype: torch.dtype
) -> torch.Tensor:
    """``(kh*kw, H_out*W_out)`` 0/1: which taps of each output pixel fall inside the image;
    depends on sizes only, so every sampler step of every block reuses it."""
    (kh, kw), stride, padding, dilation = conv
    rows = _taps(size[0], out[0], kh, stride[0], padding[0], dilation[0], device).to(dtype)
    cols = _taps(size[1], out[1], kw, stride[1], padding[1], dilation[1], device).to(dtype)
    return (rows.T[:, None, :, None] * cols.T[None, :, None, :]).reshape(kh * kw, -1)


def constant_through_conv(
    u: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d, size: Sequence[int], out: Sequence[int]
) -> torch.Tensor:
    """``conv2d`` (no bias) of input channels that are constant per sample, exactly.

    ``u`` ``(B, D)`` are the constants, ``weight`` ``(D, O * kh * kw)`` (conv's kernels
    over those inputs, transposed and flattened). With zero padding an
    output position sees only the taps that fall inside the image, so the result is
    ``sum_ij (sum_d u_d W_odij) R_yi Q_xj`` with 0/1 tap masks ``R`` (rows) and ``Q`` (columns):
    two small matmuls instead of a convolution over ``D`` constant planes.
    """
    kh, kw = conv.kernel_size
    o = weight.shape[1] // (kh * kw)
    per_tap = u @ weight  # (B, O*kh*kw)
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    inside = _inside(tuple(size), tuple(out), geometry, u.device, u.dtype)
    return (per_tap.view(-1, kh * kw) @ inside).view(u.shape[0], o, *out)


def conv_fold(conv: nn.Module, rows: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``conv``'s kernels from the ``dead`` inputs to ``rows``, as ``(dead, rows * kh * kw)``
    for :func:`constant_through_conv`."""
    fold = conv.weight.index_select(0, rows).index_select(1, dead)
    return fold.transpose(0, 1).reshape(len(dead), fold[:, :1].numel())


def positions(rows: Sequence[int], within: Sequence[int]) -> list[int]:
    """Where each of ``rows`` sits in ``within`` (rows must all be in it)."""
    where = {channel: i for i, channel in enumerate(within)}
    return [where[row] for row in rows]
