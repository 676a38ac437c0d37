"""Granularity: which weights are switched on and off together.

A granularity sees a weight through a *unit view*: ``unstructured`` makes every weight a unit,
``channel`` every row (output channel, neuron, gate row), ``n:m`` every weight again but in
groups of ``m`` consecutive weights of a row of which exactly ``n`` are active. Methods score
units; the granularity turns the scores into a new mask that keeps its pattern.

Rows are dim 0 of the weight in PyTorch layout: the output channel of Linear/Conv, a row of an
RNN gate matrix or of MultiheadAttention's ``in_proj_weight``, the input channel of a
ConvTranspose (whose layout is ``(in, out, ...)``).
"""

import math
import re
from collections.abc import Mapping, Sequence

import torch

from .scores import random_mask


class Unstructured:
    """Every weight is its own unit; the base of the other granularities."""

    name = "unstructured"
    # n:m fixes the sparsity of every structured layer at 1 - n/m; None: the distribution decides.
    fixed_sparsity: float | None = None

    def unit_shape(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        """Shape of the unit view of a weight of ``shape``; None if the layer must stay dense."""
        return (math.prod(shape),)

    def units(self, t: torch.Tensor) -> torch.Tensor:
        """The unit view of a weight-shaped mask."""
        return t.reshape(-1)

    def score(self, t: torch.Tensor) -> torch.Tensor:
        """Magnitude score per unit of a weight-shaped tensor (weights or gradient): ``|t|``."""
        return t.detach().abs().reshape(-1)

    def expand(self, units: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """A unit mask as a contiguous weight-shaped mask."""
        return units.reshape(shape)

    def plan(
        self, shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]
    ) -> dict[str, int | None]:
        """Active units per layer for the layer ``densities`` (None: keep the layer dense)."""
        return {name: round(densities[name] * math.prod(s)) for name, s in shapes.items()}

    def random_units(
        self, unit_shape: tuple[int, ...], active: int, generator: torch.Generator
    ) -> torch.Tensor:
        """A random CPU unit mask with ``active`` active units."""
        return random_mask(torch.Size(unit_shape), active, generator)

    def select(
        self, mask: torch.Tensor, drop: torch.Tensor, grow: torch.Tensor, k: int
    ) -> torch.Tensor:
        """The unit mask after dropping ``k`` units and growing ``k`` (the reference RigL rule).

        Drop the ``k`` active units with the smallest ``drop`` score; grow the ``k`` largest
        ``grow`` scores among all units inactive *after* the drop, so a just-dropped unit may
        come back. Ties are broken by `torch.topk` (deterministic on one device kind).
        """
        kept = mask.reshape(-1).clone()
        dropped = torch.topk(drop.masked_fill(~kept, math.inf), k, largest=False, sorted=False)
        kept[dropped.indices] = False
        grown = torch.topk(grow.masked_fill(kept, -math.inf), k, sorted=False)
        kept[grown.indices] = True
        return kept.view(mask.shape)

    def __repr__(self) -> str:
        return self.name


class Channel(Unstructured):
    """Whole rows (output channels, neurons, gate rows) are active or not."""

    name = "channel"

    def unit_shape(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        return (shape[0],)

    def units(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1)[:, 0]  # a channel mask is constant along its row

    def score(self, t: torch.Tensor) -> torch.Tensor:
        """L2 norm of every row."""
        rows = t.detach().reshape(t.shape[0], -1)
        return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)

    def expand(self, units: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return units.reshape(-1, *[1] * (len(shape) - 1)).expand(*shape).contiguous()

    def plan(
        self, shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]
    ) -> dict[str, int | None]:
        """Whole channels per layer, as close to the global target count as rounding allows.

        Every layer gets ``floor(density * rows)`` channels (at least one, so no layer is cut
        off); then, in order of the largest fractional remainder, a layer gets one more
        channel while that brings the global count of active weights closer to the target.
        """
        rows = {name: s[0] for name, s in shapes.items()}
        size = {name: math.prod(s) // s[0] for name, s in shapes.items()}  # weights per channel
        exact = {name: densities[name] * rows[name] for name in shapes}
        keep = {name: min(rows[name], max(1, math.floor(exact[name]))) for name in shapes}
        target = sum(densities[name] * math.prod(s) for name, s in shapes.items())
        missing = target - sum(keep[name] * size[name] for name in shapes)
        for name in sorted(shapes, key=lambda n: exact[n] - math.floor(exact[n]), reverse=True):
            if keep[name] < rows[name] and missing > size[name] / 2:
                keep[name] += 1
                missing -= size[name]
        return dict(keep)


class NM(Unstructured):
    """In every group of ``m`` consecutive weights of a row exactly ``n`` are active.

    Rows are flattened over everything but dim 0 (``in * kh * kw`` for a Conv). A layer whose
    row length is not a multiple of ``m`` cannot hold the pattern and stays dense.
    """

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = n, m
        self.name = f"{n}:{m}"
        self.fixed_sparsity = 1.0 - n / m

    def unit_shape(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        numel = math.prod(shape)
        if (numel // shape[0]) % self.m:
            return None
        return (numel // self.m, self.m)  # groups never straddle rows: rows hold whole groups

    def units(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, self.m)

    def score(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().abs().reshape(-1, self.m)

    def plan(
        self, shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]
    ) -> dict[str, int | None]:
        """``n`` of every ``m`` weights in every layer that holds the pattern; the distribution
        does not apply."""
        plan: dict[str, int | None] = {}
        for name, shape in shapes.items():
            units = self.unit_shape(shape)
            plan[name] = None if units is None else units[0] * self.n
        return plan

    def random_units(
        self, unit_shape: tuple[int, ...], active: int, generator: torch.Generator
    ) -> torch.Tensor:
        chosen = torch.rand(unit_shape, generator=generator).topk(self.n, dim=1).indices
        return torch.zeros(unit_shape, dtype=torch.bool).scatter_(1, chosen, True)

    def select(
        self, mask: torch.Tensor, drop: torch.Tensor, grow: torch.Tensor, k: int
    ) -> torch.Tensor:
        """Drop the ``k`` smallest active weights of the layer, then refill every group to ``n``.

        Each group grows as many weights as it lost, the largest ``grow`` scores among its
        weights inactive after the drop (so, as in RigL, just-dropped ones are eligible).
        """
        kept = mask.reshape(-1).clone()
        dropped = torch.topk(drop.reshape(-1).masked_fill(~kept, math.inf), k, largest=False)
        kept[dropped.indices] = False
        kept = kept.view(mask.shape)
        need = self.n - kept.sum(dim=1, keepdim=True)
        order = grow.masked_fill(kept, -math.inf).argsort(dim=1, descending=True, stable=True)
        take = torch.arange(self.m, device=mask.device) < need  # the best `need` candidates
        return kept | torch.zeros_like(kept).scatter_(1, order, take)


_NM = re.compile(r"(\d+):(\d+)")


def parse_granularity(value: object, argument: str = "granularity") -> Unstructured:
    """The granularity named by ``value``: ``"unstructured"``, ``"channel"`` or ``"n:m"``."""
    if value == "unstructured":
        return Unstructured()
    if value == "channel":
        return Channel()
    match = _NM.fullmatch(value) if isinstance(value, str) else None
    if match and 0 < int(match[1]) < int(match[2]):
        return NM(int(match[1]), int(match[2]))
    raise ValueError(
        f"{argument} must be 'unstructured', 'channel' or 'n:m' with integers 0 < n < m "
        f"(e.g. '2:4'), got {value!r}"
    )
