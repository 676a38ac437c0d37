"""The one seeded random split: shuffle ``range(n)`` with a seed and cut it into parts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def seeded_split(n: int, sizes: Sequence[int | None], part: int, seed: int = 0) -> np.ndarray:
    """Indices of part ``part`` of ``range(n)`` shuffled with ``seed``, in shuffled order.

    The permutation ``np.random.default_rng(seed).permutation(n)`` is cut into consecutive
    parts of ``sizes`` (``None``: everything left); parts are clipped at ``n``, so late parts
    may come out short or empty. The same ``(n, seed)`` always gives the same permutation, so
    the parts of one call pattern are disjoint.
    """
    if not 0 <= part < len(sizes):
        raise ValueError(f"part {part} out of range for {len(sizes)} sizes")
    order = np.random.default_rng(seed).permutation(n)
    start = 0
    for size in sizes[:part]:
        start = n if size is None else min(start + max(size, 0), n)
    size = sizes[part]
    stop = n if size is None else min(start + max(size, 0), n)
    return order[start:stop]


def fraction_sizes(n: int, fractions: Sequence[float]) -> list[int | None]:
    """Part sizes for ``fractions`` of ``n`` (normalised to sum 1): all but the last rounded,
    the last part takes the rest (``None``)."""
    total = sum(fractions)
    if total <= 0 or any(f < 0 for f in fractions):
        raise ValueError(f"split fractions must be >= 0 with a positive sum, got {fractions}")
    return [int(round(f / total * n)) for f in fractions[:-1]] + [None]
