"""When masks are updated and how large a fraction of the active weights is swapped."""

import math

SCHEDULES = ("constant", "cosine", "linear")


def stop_step(total_steps: int, stop_fraction: float) -> float:
    """Last optimizer step at which a mask update may happen: ``stop_fraction * total_steps``."""
    return stop_fraction * total_steps


def is_update_step(step: int, update_interval: int, last_step: float) -> bool:
    """True on every ``update_interval``-th optimizer step up to and including ``last_step``."""
    return step > 0 and step % update_interval == 0 and step <= last_step


def prune_fraction(step: int, prune_ratio: float, schedule: str, last_step: float) -> float:
    """Fraction ``p_t`` of a layer's active weights dropped (and regrown) at ``step``.

    constant: ``p``; cosine: ``p/2 * (1 + cos(pi * t / t_stop))``; linear: ``p * (1 - t / t_stop)``,
    with ``t_stop = last_step``. Zero after ``t_stop``.
    """
    if step > last_step:
        return 0.0
    progress = step / last_step
    if schedule == "constant":
        return prune_ratio
    if schedule == "cosine":
        return prune_ratio / 2 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return prune_ratio * (1 - progress)
    raise ValueError(f"prune_schedule must be one of {SCHEDULES}, got {schedule!r}")
