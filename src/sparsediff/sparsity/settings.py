"""`SparseSettings`: what sparse-to-sparse training is asked to do, in one place.

The one set of choices, defaults and rules of the engine. `SparseTraining` takes it (its keyword
arguments map onto it), and a run config's ``sparse`` section *is* it, so a setting has one
name, one default and one check wherever it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .distributions import DISTRIBUTIONS
from .granularity import parse_granularity
from .methods import METHODS
from .schedules import SCHEDULES


def _choice(argument: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{argument} must be one of {allowed}, got {value!r}")


def check_int(argument: str, value: Any, minimum: int) -> None:
    """Raise a ValueError naming ``argument`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value!r}")


def _number(argument: str, value: Any, low: float, high: float, interval: str) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and (low <= value if interval[0] == "[" else low < value)
    ok = ok and (value <= high if interval[1] == "]" else value < high)
    if not ok:
        raise ValueError(
            f"{argument} must be a number in {interval[0]}{low}, {high}{interval[1]}, got {value!r}"
        )


@dataclass(frozen=True)
class SparseSettings:
    """How a model is trained sparse (``docs/engine.md``).

    The defaults train dense: a run without a ``sparse`` section, or ``SparseTraining`` without
    a method, masks nothing. A dense run has no sparsity: :meth:`resolved` records it as 0,
    whatever was given.

    Args:
        method: a name in ``METHODS``: ``"dense"`` (all-True masks), ``"static"`` (masks never
            change), ``"rigl"`` (grow by dense-gradient magnitude) or ``"magran"`` (grow
            uniformly at random).
        sparsity: fraction of maskable weights that are zero, in ``[0, 1)``; 0 for dense; with
            an ``n:m`` granularity it must be ``1 - n/m``.
        distribution: layer densities, ``"uniform"``, ``"er"`` or ``"erk"``.
        erk_power_scale: exponent on the ER/ERK scale (0 gives uniform).
        update_interval: ΔT, optimizer steps between mask updates (>= 1).
        prune_ratio: p, fraction of a layer's active weights swapped per update, in (0, 1].
        prune_schedule: decay of p: ``"constant"``, ``"cosine"`` or ``"linear"``.
        stop_fraction: no mask updates after ``stop_fraction * total_steps`` steps.
        granularity: ``"unstructured"`` (single weights), ``"channel"`` (whole rows),
            ``"unit"`` (whole rows, and a GRU's whole hidden units), ``"chase"`` (single weights,
            the thinnest rows removed on a schedule: ``channel_sparsity``), ``"fanin"`` (a
            constant number of weights per live row, rows with too few salient weights
            ablated: ``min_salient``) or ``"n:m"`` such as ``"2:4"`` (n of every m consecutive
            weights of a row).
        channel_sparsity: with ``chase``: the fraction of each layer's rows removed by the last
            mask update.
        min_salient: with ``fanin``: a live row keeps at least this fraction of its fan-in
            salient at an update, or it is ablated.
        tie_stream: with ``channel``: the layers that write one residual stream share their
            channels (the model says which: ``SparseTraining(tied=...)``), so that a condensed
            network loses stream channels too.
        exclude: glob patterns of parameter names kept dense (e.g. ``"conv_in.*"``).
        include: glob patterns of extra parameter names to make sparse.
    """

    method: str = "dense"
    sparsity: float = 0.0
    distribution: str = "erk"
    erk_power_scale: float = 1.0
    update_interval: int = 100
    prune_ratio: float = 0.05
    prune_schedule: str = "cosine"
    stop_fraction: float = 0.75
    granularity: str = "unstructured"
    channel_sparsity: float = 0.5  # chase: rows removed by the last mask update
    min_salient: float = 0.3  # fanin: fewer salient weights than this share ablate a row
    tie_stream: bool = False
    exclude: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, settings: SparseSettings | None = None, **options: Any) -> SparseSettings:
        """``settings`` (default: the defaults) with ``options`` (its field names) replacing
        values: how keyword arguments of ``SparseTraining`` map onto it."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown sparse setting(s) {unknown}; known: {sorted(names)}")
        for key in ("exclude", "include"):  # a single pattern, or None, are accepted too
            if key in options:
                value = options[key]
                options[key] = [value] if isinstance(value, str) else list(value or ())
        return replace(settings or cls(), **options)

    def resolved(self) -> SparseSettings:
        """These settings as they run: a dense run's sparsity is 0 (dense ignores it)."""
        dense = self.method in METHODS and METHODS[self.method].all_dense
        return replace(self, sparsity=0.0) if dense and self.sparsity != 0 else self

    def check(self, prefix: str = "") -> None:
        """Raise a ValueError naming the first setting no run could use (``prefix``: how the
        caller names the section, e.g. ``"sparse."`` in a run config)."""
        _choice(f"{prefix}method", self.method, tuple(METHODS))
        _number(f"{prefix}sparsity", self.sparsity, 0.0, 1.0, "[)")
        _choice(f"{prefix}distribution", self.distribution, DISTRIBUTIONS)
        granularity = parse_granularity(self.granularity, f"{prefix}granularity")
        _number(f"{prefix}channel_sparsity", self.channel_sparsity, 0.0, 1.0, "[)")
        _number(f"{prefix}min_salient", self.min_salient, 0.0, 1.0, "[]")
        dense = METHODS[self.method].all_dense  # ignores sparsity and granularity
        fixed = granularity.fixed_sparsity  # n:m fixes the density
        if fixed is not None and not dense and not math.isclose(self.sparsity, fixed, abs_tol=1e-6):
            raise ValueError(
                f"{prefix}sparsity must be {fixed:.6g} (1 - n/m) with {prefix}granularity = "
                f"{self.granularity!r}, got {self.sparsity!r}"
            )
        if self.tie_stream and self.granularity != "channel":
            raise ValueError(
                f"{prefix}tie_stream = true ties channels: it needs {prefix}granularity = "
                f"'channel', got {self.granularity!r}"
            )
        _number(f"{prefix}erk_power_scale", self.erk_power_scale, 0.0, math.inf, "[)")
        check_int(f"{prefix}update_interval", self.update_interval, 1)
        _number(f"{prefix}prune_ratio", self.prune_ratio, 0.0, 1.0, "(]")
        _choice(f"{prefix}prune_schedule", self.prune_schedule, SCHEDULES)
        _number(f"{prefix}stop_fraction", self.stop_fraction, 0.0, 1.0, "[]")
