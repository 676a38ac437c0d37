"""Condensed training: between two mask updates, train through the condensed network.

Between two mask updates the set of live rows (channels, units, heads, neurons) is fixed, and
the masked full-width model computes exactly what its condensed network computes
(``models.condense``). So a step can run the narrow network instead: every tensor of the
condensed network is gathered from the full-width parameters at each step
(:func:`~sparsediff.models.condense.condensed_tensors`, differentiable), and the backward pass
carries the gradients back to them. The optimizer, its state, the EMA, the masks, the
checkpoints and resume all stay on the full-width model, untouched: nothing has to be mapped
across a condense or an inflate, and a run resumed from any checkpoint continues exactly.

What the full width is still needed for: a RigL update step ranks inactive weights by their
dense gradient, so that one step runs the masked full-width model
(:meth:`SparseTraining.dense_gradient_next`); after any mask change the condensed network is
rebuilt. Static never rebuilds; MagRan rebuilds after each update and needs no full step.

Rows are live by their **mask**, not by their values: a row that RigL just grew holds zeros
and must train. Dead channels' constants (their biases, which the masks leave alone) keep
training as they do in masked training: they are functions of the full-width biases inside
the condensed network (``docs/speedups.md``), so the two trainings are the same function and
the same gradients, up to float rounding.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from sparsediff.models.condense import condensed_tensors, plan_condense
from sparsediff.models.condense.plan import apply_plan, stream_live
from sparsediff.sparsity import SparseTraining

# granularities whose masks leave whole rows (or a GRU's units) dead
CONDENSABLE = ("channel", "unit", "chase", "fanin")


def condensed_issue(sparse: SparseTraining | None, distributed: bool) -> str | None:
    """Why a run cannot train condensed (None: it can)."""
    if sparse is None or sparse.method == "dense":
        return "a dense run has nothing to condense"
    if sparse.granularity not in CONDENSABLE:
        return (
            f"granularity {sparse.granularity!r} leaves no whole row dead (condensed training "
            f"needs one of {', '.join(CONDENSABLE)})"
        )
    if distributed:
        return "condensed training runs in one process (DDP wraps the full-width model)"
    return None


class CondensedTraining:
    """Calls like ``model`` (the loss calls it), computing through the condensed network of
    ``model``'s current masks, and trains ``model``'s own parameters."""

    def __init__(self, model: nn.Module, sparse: SparseTraining) -> None:
        self.model, self.sparse = model, sparse
        self.net: nn.Module | None = None
        self.plan: dict[str, dict[str, Any]] = {}
        self.live: dict[str, torch.Tensor] = {}
        self._version = -1
        self.rebuilds = 0

    def _rebuild(self) -> None:
        """The condensed network of the current masks: planned on a copy of the model whose
        maskable weights are their masks (live = mask, never the values)."""
        with torch.no_grad():
            shape = copy.deepcopy(self.model)
            for name, mask in self.sparse.masks.items():
                shape.get_parameter(name).copy_(mask)
            self.plan = plan_condense(shape)
            self.live = stream_live(shape)  # the residual stream's live channels, by mask
            self.net = apply_plan(shape, self.plan)
        self.net.train(self.model.training)
        self._version = self.sparse.mask_version
        self.rebuilds += 1

    def __getattr__(self, name: str) -> Any:
        """Anything else is the model's (``config``, ``dtype``): it stands in for the model."""
        if name in ("model", "sparse"):  # not set yet: no recursion through the model
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)``, through the condensed network."""
        if self._version != self.sparse.mask_version:
            self._rebuild()
        tensors = condensed_tensors(self.model, self.plan, self.net, self.live)
        return functional_call(self.net, tensors, args, kwargs)
