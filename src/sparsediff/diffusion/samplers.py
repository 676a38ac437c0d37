"""Generic DDIM / DDPM sampling loops for any ε-prediction ``model_fn(x_t, t_batch)``.

Diffusers schedulers are the schedule source (ᾱ_t, timestep spacing). DDIM steps are delegated to
:class:`~diffusers.DDIMScheduler`; the DDPM ancestral step is written out from the scheduler's
ᾱ so that the noise std can be scaled (ChiroDiff's variance-strength factor) — it equals
``DDPMScheduler.step`` exactly when ``variance_scale == 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from sparsediff.diffusion.schedules import DDIM_DEFAULTS
from sparsediff.sections import Section, at_least

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class SamplingSettings:
    """How to run the reverse chain: everything that moves a sample besides seed and weights.

    ``steps`` = sampler steps (None: 50 for DDIM, T for DDPM); ``eta`` = DDIM η;
    ``variance_scale`` multiplies the injected noise std (ChiroDiff's variance factor);
    ``guidance_scale`` is classifier-free guidance's for a conditional model (1: none; the
    model_fn applies it, two network evaluations per step above 1).
    """

    sampler: str = "ddim"
    steps: int | None = None
    eta: float = 0.0
    variance_scale: float = 1.0
    guidance_scale: float = 1.0

    @property
    def network_evaluations(self) -> int | None:
        """Network evaluations per sample (guidance evaluates the null class too)."""
        if self.steps is None:
            return None
        return self.steps * (2 if self.guidance_scale > 1 else 1)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {SAMPLERS}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
        if self.eta < 0 or self.variance_scale < 0 or self.guidance_scale < 0:
            raise ValueError(
                "eta, variance_scale and guidance_scale must be >= 0, got "
                f"{self.eta}, {self.variance_scale}, {self.guidance_scale}"
            )


@dataclass
class SampleConfig(Section):
    """A run's ``sample`` section: the sampler of its sample grids (training-time and
    ``sparsediff sample``)."""

    _RULES: ClassVar[dict[str, Any]] = {
        "sampler": SAMPLERS,
        "steps": at_least(1),
        "eta": at_least(0),
        "num": at_least(1),
        "variance_scale": at_least(0),
    }

    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50
    eta: float = 0.0
    num: int = 16
    variance_scale: float = 1.0  # ddpm noise strength (ChiroDiff's variance factor)


def _config_dict(scheduler_config: Any) -> tuple[dict[str, Any], str | None]:
    """Public config entries and the scheduler class name (if known)."""
    config = getattr(scheduler_config, "config", scheduler_config)
    if not isinstance(config, Mapping):
        raise TypeError("scheduler_config must be a diffusers scheduler or its config mapping")
    class_name = config.get("_class_name")
    if not isinstance(scheduler_config, Mapping):
        class_name = type(scheduler_config).__name__
    # Private keys matter: from_config resets every key listed in `_use_default_values`.
    return {k: v for k, v in config.items() if not k.startswith("_")}, class_name


def build_sampling_scheduler(scheduler_config: Any, sampler: str) -> Any:
    """Scheduler of the requested ``sampler`` kind sharing ``scheduler_config``'s β schedule.

    A config of another class (e.g. the training DDPM config used for DDIM sampling) gets the
    CompVis DDIM settings (:data:`DDIM_DEFAULTS`); a DDIM config is used as is.
    """
    from diffusers import DDIMScheduler, DDPMScheduler  # heavy: only when sampling

    config, class_name = _config_dict(scheduler_config)
    if sampler == "ddim":
        extra = {} if class_name == "DDIMScheduler" else DDIM_DEFAULTS
        return DDIMScheduler.from_config({**config, **extra})
    if sampler == "ddpm":
        # A DDIM config's +1 offset would index ᾱ_T (out of range) on the full T-step chain.
        extra = {} if class_name == "DDPMScheduler" else {"steps_offset": 0}
        return DDPMScheduler.from_config({**config, **extra})
    raise ValueError(f"unknown sampler {sampler!r}; expected 'ddim' or 'ddpm'")


Generators = torch.Generator | list[torch.Generator] | None


def _randn(
    shape: tuple[int, ...],
    generator: Generators,
    device: torch.device,
    noise_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Noise of ``shape``; with one generator per sample, each sample's noise is drawn alone
    at ``noise_shape`` (default ``shape[1:]``) and cropped, so it depends on its generator only.
    """
    if isinstance(generator, list):
        crop = tuple(slice(0, n) for n in shape[1:])
        draws = [_randn(noise_shape or shape[1:], g, device)[crop] for g in generator]
        return torch.stack(draws)
    # Drawn on the generator's device, then moved: same numbers whatever the model device.
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def ddpm_step(
    scheduler: Any,
    eps: torch.Tensor,
    t: int,
    prev_t: int,
    x: torch.Tensor,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """One ancestral step x_t → x_{prev_t} (posterior mean + σ·noise; ``noise=None`` → mean).

    Mirrors ``DDPMScheduler.step`` for ε-prediction without clipping; ``prev_t < 0`` means the
    final step to x_0 (ᾱ_prev = 1, no noise).
    """
    ac = scheduler.alphas_cumprod.to(x.device)
    a_t = ac[t]
    a_prev = ac[prev_t] if prev_t >= 0 else torch.ones((), device=x.device)
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mean = (a_prev.sqrt() * beta_t / (1 - a_t)) * x0 + (
        alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)
    ) * x
    if noise is None or t <= 0:
        return mean
    variance_type = scheduler.config.variance_type
    if variance_type == "fixed_small":
        var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp_min(1e-20)
    elif variance_type == "fixed_large":
        var = beta_t
    else:
        raise ValueError(f"ddpm sampling supports fixed_small/fixed_large, not {variance_type!r}")
    return mean + var.sqrt() * noise


@torch.no_grad()
def run_sampler(
    model_fn: ModelFn,
    shape: tuple[int, ...],
    scheduler_config: Any,
    settings: SamplingSettings = SamplingSettings(),
    generator: Generators = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    x_T: torch.Tensor | None = None,
    noise_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Draw samples of ``shape`` by running the reverse chain of ``model_fn``.

    ``scheduler_config``: a diffusers scheduler or its config (e.g. from
    :func:`~sparsediff.diffusion.schedules.make_scheduler`). ``settings``: DDIM (default 50
    steps, η) or DDPM (ancestral, default T steps); ``variance_scale`` multiplies the injected
    noise std (DDPM σ_t, or DDIM's η-σ_t). ``x_T`` overrides the initial noise. Deterministic
    given ``generator``; with a list of generators (one per sample) every sample's noise,
    initial and per step, comes from its own generator alone, drawn at ``noise_shape`` per
    sample (e.g. the longest sequence) and cropped to ``shape``, so a sample does not depend on
    the batch it is drawn in. Returns a float32 tensor on ``device``.
    """
    device = torch.device(device)
    sampler, eta, variance_scale = settings.sampler, settings.eta, settings.variance_scale
    sched = build_sampling_scheduler(scheduler_config, sampler)
    steps = settings.steps
    if steps is None:
        steps = 50 if sampler == "ddim" else int(sched.config.num_train_timesteps)
    sched.set_timesteps(steps)
    timesteps = [int(t) for t in sched.timesteps]
    x = (
        _randn(tuple(shape), generator, device, noise_shape)
        if x_T is None
        else x_T.to(device).float()
    )

    def noise() -> torch.Tensor:
        drawn = _randn(x.shape, generator, device, noise_shape)
        return drawn if variance_scale == 1 else drawn.mul_(variance_scale)

    for i, t in enumerate(tqdm(timesteps, disable=not progress, desc=f"{sampler} sampling")):
        t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
        eps = model_fn(x, t_batch).float()
        if sampler == "ddim":
            x = sched.step(eps, t, x, eta=eta, variance_noise=noise() if eta > 0 else None)
            x = x.prev_sample
        else:
            prev_t = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            drawn = noise() if t > 0 and variance_scale != 0 else None
            x = ddpm_step(sched, eps, t, prev_t, x, drawn)
    return x
