import math
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from sparsediff.diffusion.losses import add_noise, epsilon_mse
from sparsediff.diffusion.samplers import SamplingSettings, build_sampling_scheduler, run_sampler
from sparsediff.diffusion.schedules import DEFAULT_BETA_RANGE, SCHEDULE_KINDS, make_scheduler

# float results compared across two computations: CI runs these under other CPU kernels too
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.kernels]


def linear_eps(x, t):
    return 0.1 * x


def make_betas(kind="ldm", num_timesteps=1000):
    """Oracle β_t (float64), written from the papers; the schedulers must reproduce it.

    ``ldm``: linear in √β; ``linear``: Ho et al.'s linear β rescaled by 1000 / T (ChiroDiff);
    ``cosine``: Nichol & Dhariwal's ᾱ(t) = cos²((t + s) / (1 + s) · π/2), s = 0.008, β ≤ 0.999.
    """
    start, end = DEFAULT_BETA_RANGE[kind]
    if kind == "ldm":
        return (
            torch.linspace(math.sqrt(start), math.sqrt(end), num_timesteps, dtype=torch.float64)
            ** 2
        )
    if kind == "linear":
        scale = 1000.0 / num_timesteps
        return torch.linspace(start * scale, end * scale, num_timesteps, dtype=torch.float64)
    assert kind == "cosine"

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


# ---------------------------------------------------------------- schedules


def test_ldm_betas_golden_values():
    betas = make_betas("ldm", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(0.0015, rel=1e-12)
    assert betas[-1].item() == pytest.approx(0.0195, rel=1e-12)
    # (√0.0015 + 499/999·(√0.0195 − √0.0015))², evaluated once by hand.
    assert betas[499].item() == pytest.approx(0.007945156998524846, rel=1e-12)
    abar = torch.cumprod(1 - betas, 0)
    assert abar[-1].item() == pytest.approx(1.42304e-4, rel=1e-5)


def test_ldm_schedule_equals_diffusers_scaled_linear():
    ref = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195
    )
    torch.testing.assert_close(make_betas("ldm", 1000), ref.betas.double(), rtol=0, atol=1e-8)
    sched = make_scheduler("ldm", 1000)
    torch.testing.assert_close(sched.alphas_cumprod, ref.alphas_cumprod)
    assert sched.config.prediction_type == "epsilon" and sched.config.clip_sample is False


def test_chirodiff_linear_schedule_rescaled_to_T():
    betas = make_betas("linear", 50)
    assert betas[0].item() == pytest.approx(1e-4 * 1000 / 50)
    assert betas[-1].item() == pytest.approx(2e-2 * 1000 / 50)
    assert torch.allclose(betas.diff(), betas.diff()[0].expand(49))
    sched = make_scheduler("linear", 50)
    torch.testing.assert_close(sched.betas.double(), betas, rtol=0, atol=1e-7)
    # At T = 1000 the rescaling is the identity: Ho et al.'s 1e-4 → 2e-2.
    assert make_betas("linear", 1000)[-1].item() == pytest.approx(0.02)


def test_cosine_schedule_equals_diffusers_squaredcos():
    betas = make_betas("cosine", 1000)
    sched = make_scheduler("cosine", 1000)
    torch.testing.assert_close(sched.betas.double(), betas, rtol=0, atol=1e-7)
    assert betas.max().item() <= 0.999


def test_unknown_schedule_and_sampler_raise():
    with pytest.raises(ValueError, match="schedule kind"):
        make_scheduler("quadratic", 10)
    with pytest.raises(ValueError, match="sampler"):
        make_scheduler(sampler="euler")


def test_ddim_timesteps_leading_with_offset():
    sched = make_scheduler(sampler="ddim")
    assert isinstance(sched, DDIMScheduler)
    assert sched.config.set_alpha_to_one is False and sched.config.steps_offset == 1
    sched.set_timesteps(50)
    ts = sched.timesteps.tolist()
    assert ts[0] == 981 and ts[-1] == 1 and len(ts) == 50
    assert all(a - b == 20 for a, b in zip(ts, ts[1:]))


def test_ddim_built_from_training_config_gets_compvis_settings():
    sched = build_sampling_scheduler(make_scheduler(sampler="ddpm"), "ddim")
    assert isinstance(sched, DDIMScheduler)
    assert sched.config.set_alpha_to_one is False and sched.config.steps_offset == 1
    # And the other way round: full-chain DDPM from a DDIM config must not index ᾱ_T.
    back = build_sampling_scheduler(make_scheduler(sampler="ddim"), "ddpm")
    back.set_timesteps(1000)
    assert back.timesteps.max().item() == 999


# ---------------------------------------------------------------- losses


def test_add_noise_matches_diffusers_add_noise():
    sched = make_scheduler()
    x0, noise = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(
        add_noise(x0, t, noise, sched.alphas_cumprod), sched.add_noise(x0, noise, t)
    )


def test_epsilon_mse_oracle_zero_and_null_model_one():
    sched = make_scheduler()
    x0 = torch.randn(256, 2, 4, 4)
    abar = sched.alphas_cumprod

    def oracle(x_t, t):  # inverts add_noise exactly: returns the true ε
        a = abar[t].reshape(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    g = torch.Generator().manual_seed(0)
    assert epsilon_mse(oracle, x0, sched, generator=g).item() < 1e-6
    null = epsilon_mse(
        lambda x, t: torch.zeros_like(x), x0, sched, torch.Generator().manual_seed(0)
    )
    assert null.item() == pytest.approx(1.0, abs=0.05)


def test_epsilon_mse_reproducible_and_samples_all_timesteps():
    sched = make_scheduler(num_timesteps=10)
    seen = []

    def model(x, t):
        seen.append(t)
        return x

    x0 = torch.randn(512, 1, 2, 2)
    a = epsilon_mse(model, x0, sched, torch.Generator().manual_seed(3))
    b = epsilon_mse(model, x0, sched, torch.Generator().manual_seed(3))
    assert a.item() == b.item()
    ts = torch.cat(seen)
    assert ts.min().item() == 0 and ts.max().item() == 9


def test_epsilon_mse_reduce_fn():
    sched = make_scheduler()
    x0 = torch.randn(8, 1, 4, 4)

    def half_oracle(x_t, t):  # right on the left half, garbage elsewhere
        a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        eps[..., 2:] = 100.0
        return eps

    def left_half_mse(pred, noise):
        return ((pred - noise)[..., :2] ** 2).mean()

    g = torch.Generator().manual_seed(0)
    assert epsilon_mse(half_oracle, x0, sched, g, reduce_fn=left_half_mse).item() < 1e-6
    assert epsilon_mse(half_oracle, x0, sched, torch.Generator().manual_seed(0)).item() > 100
    calls = []
    out = epsilon_mse(
        half_oracle, x0, sched, reduce_fn=lambda p, n: calls.append((p, n)) or p.new_tensor(7.0)
    )
    assert out.item() == 7.0 and calls[0][0].shape == x0.shape


def test_schedules_module_is_light():
    code = (
        "import sys; import sparsediff.diffusion.schedules as s; "
        "assert s.SCHEDULE_KINDS and s.DEFAULT_BETA_RANGE; "
        "print(sorted(m for m in ('diffusers', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert set(DEFAULT_BETA_RANGE) == set(SCHEDULE_KINDS)


# ---------------------------------------------------------------- samplers


def hand_ddim(x, abar, timesteps, eps_fn):
    """CompVis DDIM (η = 0) with ᾱ_prev = ᾱ_0 at the last step (set_alpha_to_one=False)."""
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        a, a_prev = abar[t], abar[prev] if prev is not None else abar[0]
        eps = eps_fn(x)
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


def test_ddim_golden_value_and_hand_written_loop():
    sched = make_scheduler()
    out = run_sampler(
        linear_eps,
        (2, 3, 8, 8),
        sched,
        SamplingSettings("ddim", steps=10),
        generator=torch.Generator().manual_seed(0),
    )
    # Pinned once from this implementation (torch CPU float32).
    assert out.sum().item() == pytest.approx(388.3079, rel=1e-5)
    x_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(0)).double()
    abar = torch.cumprod(1 - make_betas("ldm", 1000), 0).tolist()
    timesteps = [901 - 100 * i for i in range(10)]
    ref = hand_ddim(x_T, abar, timesteps, lambda x: 0.1 * x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_ddim_passes_timestep_batches_to_model():
    calls = []

    def model(x, t):
        calls.append(t.clone())
        return torch.zeros_like(x)

    run_sampler(model, (3, 1, 2, 2), make_scheduler(), SamplingSettings("ddim", steps=5))
    assert [c.tolist() for c in calls] == [[t] * 3 for t in (801, 601, 401, 201, 1)]
    assert calls[0].dtype == torch.long


def test_ddpm_matches_diffusers_step_loop():
    sched = make_scheduler("linear", 50)
    shape = (2, 1, 4, 4)
    ours = run_sampler(
        linear_eps,
        shape,
        sched,
        SamplingSettings("ddpm"),
        generator=torch.Generator().manual_seed(5),
    )
    ref = DDPMScheduler.from_config(sched.config)
    ref.set_timesteps(50)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=g)
    for t in ref.timesteps:
        x = ref.step(linear_eps(x, t), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_ddpm_strided_steps_match_diffusers():
    sched = make_scheduler()
    ours = run_sampler(
        linear_eps,
        (1, 2, 3, 3),
        sched,
        SamplingSettings("ddpm", steps=20),
        generator=torch.Generator().manual_seed(1),
    )
    ref = DDPMScheduler.from_config(sched.config)
    ref.set_timesteps(20)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((1, 2, 3, 3), generator=g)
    for t in ref.timesteps:
        x = ref.step(linear_eps(x, t), t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_ddpm_variance_scale_zero_is_deterministic_and_scale_is_linear():
    sched = make_scheduler("linear", 50)
    x_T = torch.randn(2, 1, 4, 4)

    def run(scale, seed):
        g = torch.Generator().manual_seed(seed)
        settings = SamplingSettings("ddpm", variance_scale=scale)
        return run_sampler(linear_eps, x_T.shape, sched, settings, generator=g, x_T=x_T)

    torch.testing.assert_close(run(0.0, 1), run(0.0, 2))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))
    # The chain is linear in the injected noise for a linear model: noise part scales with it.
    base, full, half = run(0.0, 1), run(1.0, 1), run(0.5, 1)
    torch.testing.assert_close(half - base, 0.5 * (full - base), rtol=1e-4, atol=1e-5)


def test_ddim_eta_uses_generator_and_variance_scale():
    sched = make_scheduler()
    x_T = torch.randn(2, 1, 4, 4)

    def run(eta, seed, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        settings = SamplingSettings("ddim", steps=10, eta=eta, variance_scale=scale)
        return run_sampler(linear_eps, x_T.shape, sched, settings, generator=g, x_T=x_T)

    torch.testing.assert_close(run(0.0, 1), run(0.0, 2))
    torch.testing.assert_close(run(1.0, 1), run(1.0, 1))
    assert not torch.allclose(run(1.0, 1), run(1.0, 2))
    base, full, half = run(1.0, 1, 0.0), run(1.0, 1, 1.0), run(1.0, 1, 0.5)
    torch.testing.assert_close(half - base, 0.5 * (full - base), rtol=1e-4, atol=1e-5)


def test_sample_accepts_config_mapping_and_rejects_bad_sampler():
    sched = make_scheduler()
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    settings = SamplingSettings("ddim", steps=4)
    a = run_sampler(linear_eps, (1, 1, 2, 2), sched, settings, generator=g1)
    b = run_sampler(linear_eps, (1, 1, 2, 2), dict(sched.config), settings, generator=g2)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="sampler"):
        run_sampler(linear_eps, (1, 1, 2, 2), sched, SamplingSettings("plms"))
