"""Granularity: which weights are switched on and off together.

A granularity sees a weight through a *unit view*: ``unstructured`` makes every weight a unit,
``channel`` every row (output channel, neuron, gate row), ``unit`` a GRU's hidden units (gate
rows, recurrent column and biases together) and every other layer's rows, ``n:m`` every weight
again but in groups of ``m`` consecutive weights of a row of which exactly ``n`` are active.
Methods score units; the granularity turns the scores into a new mask that keeps its pattern.

Rows are dim 0 of the weight in PyTorch layout: the output channel of Linear/Conv, a row of an
RNN gate matrix or of MultiheadAttention's ``in_proj_weight``, the input channel of a
ConvTranspose (whose layout is ``(in, out, ...)``).
"""

import math
import re
from collections.abc import Mapping, Sequence

import torch

from .scores import random_mask


def _random_per_row(
    unit_shape: tuple[int, ...], n: int, generator: torch.Generator
) -> torch.Tensor:
    """A CPU mask of ``unit_shape`` (rows, columns) with ``n`` random columns on in every row."""
    chosen = torch.rand(unit_shape, generator=generator).topk(n, dim=1).indices
    return torch.zeros(unit_shape, dtype=torch.bool).scatter_(1, chosen, True)


def _score_dtype(t: torch.Tensor) -> torch.dtype:
    """Norms in float32 at least (half-precision weights), float64 for float64 weights."""
    return torch.promote_types(t.dtype, torch.float32)


class Unstructured:
    """Every weight is its own unit; the base of the other granularities."""

    name = "unstructured"
    # n:m fixes the sparsity of every structured layer at 1 - n/m; None: the distribution decides.
    fixed_sparsity: float | None = None
    # True: the structure changes on a schedule (chase), so an update with nothing to swap
    # still runs
    scheduled = False

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

    # a unit covers the same number of weights however many are active (not so for a GRU's
    # recurrent weight, whose entries need two live units)
    linear = True

    def weights(self, active: int, shape: Sequence[int]) -> int:
        """How many weights ``active`` units of a weight of ``shape`` hold."""
        return active * math.prod(shape) // math.prod(self.unit_shape(shape))

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
        self,
        mask: torch.Tensor,
        drop: torch.Tensor,
        grow: torch.Tensor,
        k: int,
        progress: float = 1.0,
    ) -> torch.Tensor:
        """The unit mask after dropping ``k`` units and growing ``k`` (the reference RigL rule).
        ``progress``: how far the mask updates are (0 at the start, 1 at their stop); only a
        granularity that changes its structure on a schedule reads it.

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
        return torch.linalg.vector_norm(rows, dim=1, dtype=_score_dtype(rows))

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
        return _random_per_row(unit_shape, self.n, generator)

    def select(
        self,
        mask: torch.Tensor,
        drop: torch.Tensor,
        grow: torch.Tensor,
        k: int,
        progress: float = 1.0,
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


class Chase(Unstructured):
    """Single weights, and the thinnest channels removed on a schedule (after Chase, Yin et al.,
    NeurIPS 2023): unstructured DST leaves some channels nearly empty; those go entirely, up to
    ``channel_sparsity`` of each layer's rows by the last mask update, so the network condenses
    while the rest stays unstructured.

    At every update, after the usual drop and grow (never into a removed row), the live rows with
    the smallest mean magnitude of their active weights are removed until the layer has lost
    ``channel_sparsity * progress`` of its rows; as many weights as they held are grown in the
    other rows (the largest grow scores), so the layer keeps its density. A row is removed for
    good: it is never grown into again, and a removed row holds zeros, which condense reads.
    """

    name = "chase"
    scheduled = True

    def __init__(self, channel_sparsity: float) -> None:
        self.channel_sparsity = channel_sparsity

    def unit_shape(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        return (shape[0], math.prod(shape) // shape[0])

    def units(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], -1)

    def score(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().abs().reshape(t.shape[0], -1)

    def expand(self, units: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return units.reshape(shape).contiguous()

    def select(
        self,
        mask: torch.Tensor,
        drop: torch.Tensor,
        grow: torch.Tensor,
        k: int,
        progress: float = 1.0,
    ) -> torch.Tensor:
        removed = ~mask.any(dim=1)  # rows already gone stay gone
        grow = grow.masked_fill(removed[:, None], -math.inf)
        flat = super().select(mask.reshape(-1), drop.reshape(-1), grow.reshape(-1), k)
        kept = flat.view(mask.shape)
        target = math.floor(self.channel_sparsity * progress * mask.shape[0])
        more = target - int((~kept.any(dim=1)).sum())
        live = kept.any(dim=1)
        if more <= 0 or int(live.sum()) <= more:
            return kept
        # mean magnitude of each live row's active weights (Chase's UMM)
        count = kept.sum(dim=1)
        umm = (drop.masked_fill(~kept, 0).sum(dim=1) / count.clamp_min(1)).masked_fill(
            ~live, math.inf
        )
        out = torch.topk(umm, more, largest=False).indices
        freed = int(count[out].sum())
        kept[out] = False
        room = grow.masked_fill(kept, -math.inf)
        room[out] = -math.inf
        freed = min(freed, int(torch.isfinite(room).sum()))
        if freed:
            kept.view(-1)[torch.topk(room.reshape(-1), freed).indices] = True
        return kept


class ConstantFanIn(Chase):
    """Every live row holds the same number of active weights (up to one, so that the layer
    keeps its count), and a row left with too few salient weights is ablated (after SRigL,
    Lasby et al., ICLR 2024: constant fan-in with dynamic neuron ablation).

    At every update the layer drops its ``k`` smallest active weights; a weight is *salient*
    when it survives the drop or is among the ``k`` largest grow scores of the inactive ones. A
    live row with fewer than ``min_salient`` of its fan-in salient is ablated for good (its
    weights go; it is never grown into again, and condense removes it), and every live row is
    refilled to the fan-in that keeps the layer's count: its surviving weights, then its largest
    grow scores.
    """

    name = "fanin"
    scheduled = False

    def __init__(self, min_salient: float) -> None:
        self.min_salient = min_salient

    def plan(
        self, shapes: Mapping[str, Sequence[int]], densities: Mapping[str, float]
    ) -> dict[str, int | None]:
        """A whole fan-in per row: ``round(density * row length)`` weights in every row."""
        plan: dict[str, int | None] = {}
        for name, shape in shapes.items():
            rows, cols = shape[0], math.prod(shape) // shape[0]
            plan[name] = rows * min(cols, max(1, round(densities[name] * cols)))
        return plan

    def random_units(
        self, unit_shape: tuple[int, ...], active: int, generator: torch.Generator
    ) -> torch.Tensor:
        return _random_per_row(unit_shape, active // unit_shape[0], generator)

    def select(
        self,
        mask: torch.Tensor,
        drop: torch.Tensor,
        grow: torch.Tensor,
        k: int,
        progress: float = 1.0,
    ) -> torch.Tensor:
        live, total = mask.any(dim=1), int(mask.sum())
        fan = total // max(1, int(live.sum()))
        kept = mask.reshape(-1).clone()
        gone = torch.topk(drop.reshape(-1).masked_fill(~kept, math.inf), k, largest=False).indices
        kept[gone] = False
        kept = kept.view(mask.shape)
        grow = grow.masked_fill(~live[:, None], -math.inf)  # ablated rows stay ablated
        candidates = torch.zeros_like(kept).view(-1)
        candidates[torch.topk(grow.masked_fill(kept, -math.inf).reshape(-1), k).indices] = True
        salient = (kept | candidates.view(mask.shape)).sum(dim=1)
        ablate = live & (salient < self.min_salient * fan)
        if bool((live & ~ablate).any()):  # a layer keeps at least one row
            live = live & ~ablate
        rows, cols = mask.shape
        fan, extra = divmod(total, int(live.sum()))
        if fan >= cols:
            fan, extra = cols, 0
        # each live row: its surviving weights first, then its largest grow scores; the
        # ``extra`` rows with the best next candidate take one more, so the count is kept
        priority = torch.where(kept, math.inf, grow).masked_fill(~live[:, None], -math.inf)
        top = priority.topk(min(cols, fan + 1), dim=1)
        take = torch.arange(top.indices.shape[1], device=mask.device) < fan
        take = take.expand(rows, -1).clone()
        if extra and top.indices.shape[1] > fan:
            nxt = top.values[:, fan].masked_fill(~live, -math.inf)
            take[torch.topk(nxt, extra).indices, fan] = True
        new = torch.zeros_like(mask).scatter_(1, top.indices, take)
        return new & live[:, None]


class GateRows(Channel):
    """A GRU input weight ``(3H, in)`` seen by hidden unit: unit ``j`` is row ``j`` of every
    gate (reset, update, new: rows ``j``, ``H + j``, ``2H + j``)."""

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden

    def unit_shape(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        return (self.hidden,)

    def _gates(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(3, self.hidden, -1)  # (gate, unit, inputs)

    def units(self, t: torch.Tensor) -> torch.Tensor:
        return self._gates(t)[0, :, 0]

    def score(self, t: torch.Tensor) -> torch.Tensor:
        """L2 norm of each unit's rows over the three gates."""
        gates = self._gates(t.detach()).transpose(0, 1).reshape(self.hidden, -1)
        return torch.linalg.vector_norm(gates, dim=1, dtype=_score_dtype(gates))

    def expand(self, units: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        cols = math.prod(shape) // (3 * self.hidden)
        return units.view(1, -1, 1).expand(3, self.hidden, cols).reshape(shape).contiguous()


class GateRowsAndColumns(GateRows):
    """A GRU recurrent weight ``(3H, H)``: unit ``j`` is its gate rows and its column ``j``
    (what it reads of its own past), so an entry lives while both its units do."""

    def units(self, t: torch.Tensor) -> torch.Tensor:
        return self._gates(t)[0].diagonal()

    def score(self, t: torch.Tensor) -> torch.Tensor:
        """L2 norm of each unit's rows and column."""
        t = t.detach().float()
        rows = self._gates(t).transpose(0, 1).reshape(self.hidden, -1).square().sum(dim=1)
        cols = t.square().sum(dim=0) - self._gates(t).square().diagonal(dim1=1, dim2=2).sum(0)
        return (rows + cols).clamp_min(0).sqrt()

    def expand(self, units: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        both = units.view(-1, 1) & units.view(1, -1)
        return both.expand(3, -1, -1).reshape(shape).contiguous()

    linear = False

    def weights(self, active: int, shape: Sequence[int]) -> int:
        return 3 * active * active


class GateBias(GateRows):
    """A GRU bias ``(3H,)``: unit ``j`` is its three gate entries; a unit without them outputs
    exactly zero (its new-gate activation is ``tanh(0) = 0``)."""

    def units(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(3, self.hidden)[0]

    def score(self, t: torch.Tensor) -> torch.Tensor:
        gates = t.detach().reshape(3, self.hidden).transpose(0, 1)
        return torch.linalg.vector_norm(gates, dim=1, dtype=_score_dtype(gates))

    def expand(self, units: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        return units.view(1, -1).expand(3, -1).reshape(shape).contiguous()


class Unit(Channel):
    """Whole hidden units of GRUs, whole rows elsewhere.

    A GRU unit (one layer, one direction) is its three gate rows of the input and recurrent
    weights, its recurrent column and its biases: masked as one, it outputs exactly zero, so a
    condensed GRU drops it (``models.condense``). The next layer reads a dead unit's zeros
    through its input columns, which condensing removes too. Elsewhere a unit is a channel.
    """

    name = "unit"

    def structure(
        self, model: "torch.nn.Module", names: Sequence[str]
    ) -> tuple[dict[str, Unstructured], list[list[str]]]:
        """Per maskable parameter the view its units are seen through, and the groups of
        parameters that share one unit mask (a GRU layer and direction: input weight,
        recurrent weight and both biases). The biases join the maskable parameters."""
        views: dict[str, Unstructured] = {}
        groups: list[list[str]] = []
        for prefix, module in model.named_modules():
            if not isinstance(module, torch.nn.GRU):
                continue
            dot = f"{prefix}." if prefix else ""
            for layer in range(module.num_layers):
                for sfx in ("", "_reverse")[: 1 + module.bidirectional]:
                    end = f"_l{layer}{sfx}"
                    member = {
                        f"{dot}weight_ih{end}": GateRows(module.hidden_size),
                        f"{dot}weight_hh{end}": GateRowsAndColumns(module.hidden_size),
                    }
                    if module.bias:
                        member[f"{dot}bias_ih{end}"] = GateBias(module.hidden_size)
                        member[f"{dot}bias_hh{end}"] = GateBias(module.hidden_size)
                    views.update(member)
                    groups.append(list(member))
        for name in names:
            views.setdefault(name, self)
        return views, groups


_NM = re.compile(r"(\d+):(\d+)")


def parse_granularity(
    value: object,
    argument: str = "granularity",
    channel_sparsity: float = 0.5,
    min_salient: float = 0.3,
) -> Unstructured:
    """The granularity named by ``value``: ``"unstructured"``, ``"channel"``, ``"unit"``,
    ``"chase"`` (with ``channel_sparsity``), ``"fanin"`` (with ``min_salient``) or ``"n:m"``."""
    if value == "unstructured":
        return Unstructured()
    if value == "channel":
        return Channel()
    if value == "unit":
        return Unit()
    if value == "chase":
        return Chase(channel_sparsity)
    if value == "fanin":
        return ConstantFanIn(min_salient)
    match = _NM.fullmatch(value) if isinstance(value, str) else None
    if match and 0 < int(match[1]) < int(match[2]):
        return NM(int(match[1]), int(match[2]))
    raise ValueError(
        f"{argument} must be 'unstructured', 'channel', 'unit', 'chase', 'fanin' or 'n:m' with "
        "integers 0 < n < m "
        f"(e.g. '2:4'), got {value!r}"
    )
