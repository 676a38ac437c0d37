"""Seeded randomness and what a method reads to score the units of one layer."""

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .granularity import Unstructured


def seeded_generator(seed: int, step: int, layer: int) -> torch.Generator:
    """CPU generator seeded from ``(seed, step, layer)``.

    Every rank and device kind draws the same numbers, and no RNG state needs saving.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{layer}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def random_mask(shape: torch.Size, active: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean CPU mask of ``shape`` with exactly ``active`` True entries, uniformly placed."""
    numel = shape.numel()
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.topk(torch.rand(numel, generator=generator), active).indices] = True
    return mask.view(shape)


@dataclass
class LayerScores:
    """One layer at an update, as a method sees it: scores come out one per unit."""

    weight: torch.Tensor  # the post-step weights
    grad: torch.Tensor | None  # the dense gradient of the step (never masked)
    granularity: "Unstructured"
    seed: int
    step: int
    index: int  # the layer's position among the maskable parameters

    def magnitude(self, t: torch.Tensor) -> torch.Tensor:
        """``|t|`` per unit: per weight, or the L2 norm of each channel."""
        return self.granularity.score(t)

    def random(self) -> torch.Tensor:
        """Uniform scores per unit, drawn on the CPU from ``(seed, step, layer)`` (so CPU and
        CUDA runs and all ranks agree), then moved to the weight's device."""
        shape = self.granularity.unit_shape(self.weight.shape)
        generator = seeded_generator(self.seed, self.step, self.index)
        return torch.rand(shape, generator=generator).to(self.weight.device)
