"""Parameter and FLOP counts of a masked model.

Dense FLOPs of one forward come from `torch.utils.flop_counter.FlopCounterMode` (matmuls,
convolutions, attention; elementwise ops are not counted). Every counted op is attributed
to the weight it reads (found by storage address, so transposed views and slices such as
MultiheadAttention's q/k/v thirds of ``in_proj_weight`` count too) and scaled by that
weight's density. Ops that read no weight, such as attention products between activations,
are not reduced. RNN/GRU/LSTM kernels that FlopCounterMode does not count (fused backends)
are counted analytically: ``2 * numel(W)`` per weight matrix per valid token, i.e.
``2 * (3H*in + 3H*H)`` per step, layer and direction for a GRU. CPU flash attention, which
FlopCounterMode does not count, gets the standard SDPA formula.
"""

import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from .engine import SparseTraining
from .methods import METHODS
from .schedules import stop_step
from .selection import unwrap


@dataclass(frozen=True)
class LayerFlops:
    """FLOPs of the ops that read one weight, in one forward."""

    dense: int
    density: float

    @property
    def sparse(self) -> float:
        """FLOPs with the weight at its density."""
        return self.dense * self.density


@dataclass(frozen=True)
class FlopReport:
    """Inference FLOPs of one forward: ``sparse = other + sum(layer.dense * layer.density)``."""

    dense: int
    sparse: float
    per_layer: dict[str, LayerFlops]
    other: int  # FLOPs of ops that read no weight (not reduced by sparsity)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Total and non-zero number of parameters (shared parameters counted once)."""
    params = list(unwrap(model).parameters())
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    return total, nonzero


def rnn_flops(module: nn.RNNBase, tokens: int) -> dict[str, int]:
    """Analytic forward FLOPs per weight matrix of an RNN/GRU/LSTM for ``tokens`` valid steps.

    ``tokens`` counts (sequence element, batch element) pairs; every weight matrix is one
    multiply-add per entry per token and direction, so ``2 * numel(W) * tokens``.
    """
    return {
        name: 2 * p.numel() * tokens
        for name, p in module.named_parameters(recurse=False)
        if "weight" in name
    }


def _tokens(inputs: tuple[Any, ...]) -> int:
    """Valid (time step, batch element) pairs in an RNN input."""
    x = inputs[0]
    if isinstance(x, PackedSequence):
        return int(x.batch_sizes.sum())
    return x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]


def _sdpa_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """QK^T and AV of scaled dot-product attention: ``2 b h s_q s_k (d_qk + d_v)``."""
    *batch, s_q, d_qk = query
    s_k, d_v = value[-2], value[-1]
    return 2 * math.prod(batch) * s_q * s_k * (d_qk + d_v)


# Attention kernels FlopCounterMode does not know (CPU flash attention), so that the same
# model gets the same count on CPU as on CUDA.
_EXTRA_FORMULAS: dict[Any, Callable] = {
    getattr(torch.ops.aten, op): _sdpa_flops
    for op in ("_scaled_dot_product_flash_attention_for_cpu",)
    if hasattr(torch.ops.aten, op) and getattr(torch.ops.aten, op) not in flop_registry
}


class _AttributingCounter(FlopCounterMode):
    """FlopCounterMode that also sums every op's FLOPs per parameter it reads."""

    def __init__(self, model: nn.Module, formulas: Mapping[Any, Callable] | None) -> None:
        super().__init__(display=False, custom_mapping={**_EXTRA_FORMULAS, **(formulas or {})})
        self.by_param: dict[str | None, int] = defaultdict(int)
        # storage address -> (first byte, end byte, ndim, numel, name) of each parameter
        self.ranges: dict[int, list[tuple[int, int, int, int, str]]] = defaultdict(list)
        for name, p in model.named_parameters():
            start = p.data_ptr()
            entry = (start, start + p.numel() * p.element_size(), p.dim(), p.numel(), name)
            self.ranges[p.untyped_storage().data_ptr()].append(entry)

    def _owner(self, args: Any, kwargs: Any) -> str | None:
        """Name of the weight an op reads: the largest matching parameter (not its bias)."""
        best: tuple[int, int, str] | None = None
        for t in tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            for start, end, ndim, numel, name in self.ranges.get(
                t.untyped_storage().data_ptr(), ()
            ):
                if start <= t.data_ptr() < end and (best is None or (ndim, numel) > best[:2]):
                    best = (ndim, numel, name)
        return None if best is None else best[2]

    def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
        if func_packet in self.flop_registry:
            flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
            self.by_param[self._owner(args, kwargs)] += flops
        return super()._count_flops(func_packet, out, args, kwargs)


def _densities(
    model: nn.Module, densities: "Mapping[str, float] | SparseTraining | None", names: list[str]
) -> dict[str, float]:
    if isinstance(densities, SparseTraining):
        measured = densities.stats()["layer_density"]
        return {name: measured.get(name, 1.0) for name in names}
    if densities is not None:
        return {name: float(densities.get(name, 1.0)) for name in names}
    params = dict(model.named_parameters())
    return {name: int(torch.count_nonzero(params[name])) / params[name].numel() for name in names}


def inference_flops(
    model: nn.Module,
    *example_inputs: Any,
    densities: "Mapping[str, float] | SparseTraining | None" = None,
    flop_formulas: Mapping[Any, Callable] | None = None,
    **kwargs: Any,
) -> FlopReport:
    """FLOPs of one forward ``model(*example_inputs, **kwargs)``, dense and masked.

    ``densities`` maps parameter names to densities; by default each weight's measured
    non-zero fraction is used, or pass a `SparseTraining` to use its masks (weights it does
    not mask count as dense). ``flop_formulas`` adds or overrides FlopCounterMode formulas
    (``{aten_op: fn}``). The forward runs under ``torch.no_grad()`` in the model's current
    train/eval mode; run it without autocast so weights are read in place.
    """
    model = unwrap(model)
    counter = _AttributingCounter(model, flop_formulas)
    tokens: dict[nn.Module, int] = defaultdict(int)

    def record(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        tokens[module] += _tokens(inputs)

    rnns = {m: prefix for prefix, m in model.named_modules() if isinstance(m, nn.RNNBase)}
    handles = [m.register_forward_pre_hook(record) for m in rnns]
    try:
        with torch.no_grad(), counter:
            model(*example_inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    by_param = dict(counter.by_param)
    for module, prefix in rnns.items():
        analytic = rnn_flops(module, tokens[module])
        names = {f"{prefix}.{n}" if prefix else n: f for n, f in analytic.items()}
        if all(by_param.get(name, 0) == 0 for name in names):  # backend kernel not counted
            by_param.update(names)
    other = by_param.pop(None, 0)
    density = _densities(model, densities, list(by_param))
    per_layer = {name: LayerFlops(f, density[name]) for name, f in by_param.items() if f}
    dense = other + sum(layer.dense for layer in per_layer.values())
    sparse = other + math.fsum(layer.sparse for layer in per_layer.values())
    return FlopReport(dense=dense, sparse=sparse, per_layer=per_layer, other=other)


def training_flops_per_step(
    dense_flops: float,
    sparse_flops: float,
    method: str,
    update_interval: int = 100,
    total_steps: int | None = None,
    stop_fraction: float = 1.0,
) -> float:
    """Training FLOPs of one optimizer step (forward + backward ≈ 3 forwards), on average.

    dense: ``3 f_D``; static and MagRan: ``3 f_S``; RigL (any method whose update step also
    needs the dense gradient, ``2 f_S + f_D`` instead of ``3 f_S``): over a run of
    ``total_steps`` whose updates stop at ``stop_fraction``, ``3 f_S + U (f_D - f_S) / T`` with
    ``U`` the number of update steps the engine makes; without ``total_steps``, the RigL paper's
    ``(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1)`` (updates never stop).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if isinstance(update_interval, bool) or not isinstance(update_interval, int):
        raise ValueError(f"update_interval must be an integer >= 1, got {update_interval!r}")
    if update_interval < 1:
        raise ValueError(f"update_interval must be an integer >= 1, got {update_interval!r}")
    if METHODS[method].all_dense:
        return 3.0 * dense_flops
    if METHODS[method].needs_dense_grad:
        dt = update_interval
        if total_steps is None:
            return (3.0 * sparse_flops * dt + 2.0 * sparse_flops + dense_flops) / (dt + 1)
        updates = math.floor(stop_step(total_steps, stop_fraction) / dt)  # steps dt, 2 dt, ...
        return 3.0 * sparse_flops + updates * (dense_flops - sparse_flops) / total_steps
    return 3.0 * sparse_flops
