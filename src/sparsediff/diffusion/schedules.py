"""Noise schedules (β_t) as diffusers scheduler configs, and scheduler construction.

Importing this module is cheap (diffusers is imported by :func:`make_scheduler` only), so
configuration code can use :data:`SCHEDULE_KINDS` and :data:`DEFAULT_BETA_RANGE`.

Kinds:

* ``"ldm"``: linear in √β, ``β_t = linspace(√β_start, √β_end, T)²`` — the CompVis LDM
  ``linear`` schedule (β 0.0015 → 0.0195, T = 1000), identical to diffusers' ``scaled_linear``.
* ``"linear"``: ChiroDiff / DDPM linear β from ``β_start·1000/T`` to ``β_end·1000/T`` (defaults
  1e-4 → 2e-2), i.e. Ho et al.'s schedule rescaled so that a short chain (e.g. T = 50) keeps the
  same total noise level.
* ``"cosine"``: Nichol & Dhariwal's cosine ᾱ schedule (s = 0.008, β ≤ 0.999), identical to
  diffusers' ``squaredcos_cap_v2``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

from sparsediff.sections import Section, at_least

if TYPE_CHECKING:
    from diffusers import DDIMScheduler, DDPMScheduler

SCHEDULE_KINDS = ("ldm", "linear", "cosine")

# Per-kind default (β_start, β_end); "cosine" has none.
DEFAULT_BETA_RANGE: dict[str, tuple[float, float]] = {
    "ldm": (0.0015, 0.0195),
    "linear": (1e-4, 2e-2),
    "cosine": (0.0, 0.0),
}


@dataclass
class ScheduleConfig(Section):
    """A run's ``diffusion`` section: the noise schedule of the forward process."""

    _RULES: ClassVar[dict[str, Any]] = {"schedule": SCHEDULE_KINDS, "timesteps": at_least(1)}

    schedule: str = "ldm"  # ldm (linear in sqrt beta) | linear (ChiroDiff) | cosine
    timesteps: int = 1000
    # 0.0 = the schedule's default (DEFAULT_BETA_RANGE): ldm 0.0015 and 0.0195, linear 1e-4
    # and 2e-2 (cosine uses none); the resolved config holds the number
    beta_start: float = 0.0
    beta_end: float = 0.0

    def resolved(self) -> ScheduleConfig:
        """The β range with the schedule's defaults written in, so config.json is explicit."""
        default = DEFAULT_BETA_RANGE.get(self.schedule)
        if default is None:  # an unknown schedule: check names it
            return self
        return replace(
            self,
            beta_start=self.beta_start or default[0],
            beta_end=self.beta_end or default[1],
        )

    def check(self, section: str) -> None:
        """The rules beside the fields, and an increasing β range below 1."""
        super().check(section)
        if self.schedule != "cosine" and not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(
                f"{section}.beta_start/beta_end must satisfy 0 < start <= end < 1 for the "
                f"{self.schedule!r} schedule, got {self.beta_start}, {self.beta_end}"
            )


# CompVis DDIM: uniform "leading" timesteps shifted by +1, last step towards ᾱ_0 (not 1).
DDIM_DEFAULTS: dict[str, Any] = {
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _beta_range(kind: str, beta_start: float | None, beta_end: float | None) -> tuple[float, float]:
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
    default_start, default_end = DEFAULT_BETA_RANGE[kind]
    return (
        default_start if beta_start is None else beta_start,
        default_end if beta_end is None else beta_end,
    )


def scheduler_kwargs(
    kind: str = "ldm",
    num_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> dict[str, Any]:
    """Diffusers scheduler config entries for a β schedule of :data:`SCHEDULE_KINDS`.

    ``beta_start``/``beta_end`` default per kind (:data:`DEFAULT_BETA_RANGE`); for ``linear``
    they are multiplied by ``1000 / num_timesteps`` (ChiroDiff's rescaling).
    """
    start, end = _beta_range(kind, beta_start, beta_end)
    common: dict[str, Any] = {
        "num_train_timesteps": num_timesteps,
        "prediction_type": "epsilon",
        "clip_sample": False,
    }
    if kind == "ldm":
        return {**common, "beta_schedule": "scaled_linear", "beta_start": start, "beta_end": end}
    if kind == "linear":
        scale = 1000.0 / num_timesteps
        return {
            **common,
            "beta_schedule": "linear",
            "beta_start": start * scale,
            "beta_end": end * scale,
        }
    return {**common, "beta_schedule": "squaredcos_cap_v2"}


def make_scheduler(
    kind: str = "ldm",
    num_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    sampler: str = "ddpm",
) -> DDPMScheduler | DDIMScheduler:
    """Build a diffusers ε-prediction scheduler for the given β schedule.

    ``sampler="ddpm"`` gives a :class:`~diffusers.DDPMScheduler` (training ``add_noise`` and
    ancestral sampling, fixed-small variance); ``"ddim"`` a :class:`~diffusers.DDIMScheduler` with
    the CompVis LDM settings (``set_alpha_to_one=False``, ``steps_offset=1``, leading spacing).
    ``prediction_type="epsilon"`` and ``clip_sample=False`` as in LDM. Defaults reproduce LDM-4
    (T = 1000, β 0.0015 → 0.0195, linear in √β).
    """
    from diffusers import DDIMScheduler, DDPMScheduler

    kwargs = scheduler_kwargs(kind, num_timesteps, beta_start, beta_end)
    if sampler == "ddpm":
        return DDPMScheduler(**kwargs, variance_type="fixed_small")
    if sampler == "ddim":
        return DDIMScheduler(**kwargs, **DDIM_DEFAULTS)
    raise ValueError(f"unknown sampler {sampler!r}; expected 'ddpm' or 'ddim'")
