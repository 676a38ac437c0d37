"""Sparse training methods as small objects, in a registry keyed by name.

A method decides the initial layer densities (``plan``) and, if it updates masks, scores every
unit of a layer for dropping and for growing; the engine and the granularity do the rest.
Adding a method is one subclass and one entry in ``METHODS``.
"""

import math
from collections.abc import Mapping, Sequence

import torch

from .distributions import layer_densities
from .granularity import Unstructured
from .scores import LayerScores


class Method:
    """The base: random initial masks at the configured densities, never updated."""

    name = ""
    updates_masks = False  # True: drop and grow every ΔT steps with the two scores
    needs_dense_grad = False  # the grow score reads the dense gradient (RigL)
    all_dense = False  # True: every layer stays dense, ``sparsity`` ignored (Dense)

    def plan(
        self,
        shapes: Mapping[str, Sequence[int]],
        granularity: Unstructured,
        sparsity: float,
        distribution: str,
        erk_power_scale: float,
        tied: Sequence[Sequence[str]] = (),
        views: Mapping[str, Unstructured] | None = None,
    ) -> dict[str, int | None]:
        """Active units per layer (None: dense).

        A ``tied`` group of layers (channel granularity, equal unit counts) is planned as one
        layer with its members' units side by side, at the density the distribution gives its
        members together, so every member keeps the same number of units. A group whose units
        hold a number of weights that is not proportional to their count (``views``: a GRU's
        hidden units, ``granularity.Unit``) gets the unit count whose weights come closest.
        """
        if self.all_dense:
            return dict.fromkeys(shapes)
        densities = layer_densities(shapes, sparsity, distribution, erk_power_scale)
        views = views or dict.fromkeys(shapes, granularity)
        curved = [g for g in tied if not all(views[n].linear for n in g)]
        tied = [g for g in tied if g not in curved]
        merged_shapes, merged_densities = dict(shapes), dict(densities)
        for group in curved:
            for name in group:
                del merged_shapes[name], merged_densities[name]
        for group in tied:
            numel = {name: math.prod(shapes[name]) for name in group}
            for name in group:
                del merged_shapes[name], merged_densities[name]
            rows = views[group[0]].unit_shape(shapes[group[0]])[0]
            merged_shapes[group[0]] = (rows, sum(numel.values()) // rows)
            merged_densities[group[0]] = sum(densities[n] * numel[n] for n in group) / sum(
                numel.values()
            )
        plan = granularity.plan(merged_shapes, merged_densities)
        for group in tied:
            plan.update(dict.fromkeys(group[1:], plan[group[0]]))
        for group in curved:
            target = sum(densities[n] * math.prod(shapes[n]) for n in group)
            count = views[group[0]].unit_shape(shapes[group[0]])[0]

            def gap(active: int, group: Sequence[str] = group, target: float = target) -> float:
                return abs(sum(views[n].weights(active, shapes[n]) for n in group) - target)

            plan.update(dict.fromkeys(group, min(range(1, count + 1), key=gap)))
        return {name: plan[name] for name in shapes}

    def __repr__(self) -> str:
        return self.name


class Dense(Method):
    """The dense baseline through the same code path: all-True masks, ``sparsity`` ignored."""

    name = "dense"
    all_dense = True


class Static(Method):
    """Random initial masks that never change."""

    name = "static"


class MagRan(Method):
    """Every ΔT steps drop the smallest magnitudes and grow uniformly at random."""

    name = "magran"
    updates_masks = True

    def drop_score(self, layer: LayerScores) -> torch.Tensor:
        """Per unit; the active units with the smallest scores are dropped."""
        return layer.magnitude(layer.weight)

    def grow_score(self, layer: LayerScores) -> torch.Tensor:
        """Per unit; the inactive units with the largest scores are grown."""
        return layer.random()


class RigL(MagRan):
    """MagRan that grows where the dense gradient is largest (Evci et al., 2020)."""

    name = "rigl"
    needs_dense_grad = True

    def grow_score(self, layer: LayerScores) -> torch.Tensor:
        assert layer.grad is not None  # the engine skips layers without a gradient
        return layer.magnitude(layer.grad)


METHODS: dict[str, Method] = {m.name: m for m in (Dense(), Static(), RigL(), MagRan())}
