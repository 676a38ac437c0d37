"""Drop and grow scores, and the drop/grow selection shared by RigL and MagRan.

An algorithm is a drop score (magnitude for both) and a grow score: RigL ranks the
candidates by the dense gradient magnitude, MagRan by uniform random numbers.
"""

import hashlib

import torch


def seeded_generator(seed: int, step: int, layer: int) -> torch.Generator:
    """CPU generator seeded from ``(seed, step, layer)``.

    Every rank and device kind draws the same numbers, and no RNG state needs saving.
    """
    digest = hashlib.sha256(f"{seed}:{step}:{layer}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def random_scores(numel: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform scores drawn on the CPU (so CPU and CUDA runs agree), then moved to ``device``."""
    return torch.rand(numel, generator=generator).to(device)


def random_mask(shape: torch.Size, active: int, generator: torch.Generator) -> torch.Tensor:
    """Boolean CPU mask of ``shape`` with exactly ``active`` True entries, uniformly placed."""
    numel = shape.numel()
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.topk(torch.rand(numel, generator=generator), active).indices] = True
    return mask.view(shape)


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """Drop score: ``|w|`` (the smallest active magnitudes are dropped)."""
    return weight.detach().abs().reshape(-1)


def gradient_score(grad: torch.Tensor) -> torch.Tensor:
    """RigL grow score: the dense gradient magnitude ``|g|``."""
    return grad.detach().abs().reshape(-1)


def drop_and_grow(
    drop_score: torch.Tensor, grow_score: torch.Tensor, mask: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the ``k`` active entries to drop and ``k`` inactive entries to grow.

    Drop: the ``k`` smallest ``drop_score`` among active entries. Grow: the ``k`` largest
    ``grow_score`` among entries that were inactive before the drop, so the two sets are
    disjoint and grown entries are inactive after the drop. Requires
    ``k <= min(active, inactive)``. Ties are broken by `torch.topk`, which is deterministic
    for identical inputs on one device kind.
    """
    active = mask.reshape(-1)
    drop = drop_score.masked_fill(~active, float("inf"))
    dropped = torch.topk(drop, k, largest=False, sorted=False).indices
    grow = grow_score.masked_fill(active, float("-inf"))
    grown = torch.topk(grow, k, sorted=False).indices
    return dropped, grown
