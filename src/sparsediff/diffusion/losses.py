"""ε-prediction training objective (Ho et al. 2020 "simple" loss, as used by LDM and ChiroDiff)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ReduceFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _expand(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coef.reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Forward-diffuse ``x0`` to step ``t``: ``√ᾱ_t·x0 + √(1−ᾱ_t)·noise`` (per-sample ``t``)."""
    abar = alphas_cumprod.to(device=x0.device)[t.to(x0.device)].to(x0.dtype)
    abar = _expand(abar, x0)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # Draw on the generator's device so a CPU generator stays reproducible for CUDA data.
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def epsilon_mse(
    model_fn: ModelFn,
    x0: torch.Tensor,
    scheduler: object,
    generator: torch.Generator | None = None,
    reduce_fn: ReduceFn | None = None,
) -> torch.Tensor:
    """ε-prediction MSE with ``t ~ U{0, …, T−1}`` and ``ε ~ N(0, I)``.

    ``model_fn(x_t, t) -> ε̂``; ``scheduler`` is any diffusers scheduler with ``alphas_cumprod``
    and ``config.num_train_timesteps``. ``reduce_fn(pred, target)`` replaces the plain mean
    (e.g. ChiroDiff's masked MSE over valid points). Given ``generator``, ``t`` and ``ε`` are
    reproducible.
    """
    num_timesteps = int(scheduler.config.num_train_timesteps)
    gen_device = generator.device if generator is not None else x0.device
    t = torch.randint(0, num_timesteps, (x0.shape[0],), generator=generator, device=gen_device)
    t = t.to(x0.device)
    noise = _randn_like(x0, generator)
    x_t = add_noise(x0, t, noise, scheduler.alphas_cumprod)
    pred = model_fn(x_t, t)
    if reduce_fn is not None:
        return reduce_fn(pred, noise)
    return F.mse_loss(pred.float(), noise.float())
