"""Per-layer densities: uniform, Erdős–Rényi (ER) and Erdős–Rényi-Kernel (ERK)."""

import math
from collections.abc import Mapping, Sequence

DISTRIBUTIONS = ("uniform", "er", "erk")


def density_scale(shape: Sequence[int], distribution: str, erk_power_scale: float = 1.0) -> float:
    """Unnormalised density of a layer with weight ``shape`` (PyTorch layout, out first).

    ER uses the fan-out and fan-in only, ``(n_in + n_out) / (n_in * n_out)`` with
    ``n_out = shape[0]`` and ``n_in = shape[1]``; ERK adds the kernel dimensions,
    ``sum(shape) / prod(shape)``. Both are raised to ``erk_power_scale``. RNN weights
    such as a GRU's ``(3H, in)`` are plain 2-D matrices here.
    """
    if distribution == "uniform":
        return 1.0
    if distribution == "er":
        dims = [shape[0], shape[1] if len(shape) > 1 else 1]
    elif distribution == "erk":
        dims = list(shape)
    else:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    return (sum(dims) / math.prod(dims)) ** erk_power_scale


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    sparsity: float,
    distribution: str = "erk",
    erk_power_scale: float = 1.0,
) -> dict[str, float]:
    """Density of every layer so that the global sparsity over all layers is ``sparsity``.

    Non-uniform densities are ``eps * density_scale(layer)``. A layer whose density would
    exceed 1 is kept dense and ``eps`` is re-solved for the others, which raises ``eps``;
    this repeats (largest scale first, as in RigL) until no layer exceeds 1. Rounding each
    layer to whole weights then leaves the global count within half a weight per layer.
    """
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    if distribution == "uniform" or sparsity == 0.0:
        return {name: 1.0 - sparsity for name in shapes}
    scale = {name: density_scale(s, distribution, erk_power_scale) for name, s in shapes.items()}
    target = (1.0 - sparsity) * sum(numel.values())
    dense: set[str] = set()
    while True:
        free = [n for n in shapes if n not in dense]
        budget = target - sum(numel[n] for n in dense)
        eps = budget / sum(scale[n] * numel[n] for n in free)
        largest = max(free, key=lambda n: scale[n])
        if eps * scale[largest] <= 1.0 or len(free) == 1:
            break
        dense.add(largest)
    return {n: 1.0 if n in dense else min(1.0, eps * scale[n]) for n in shapes}
