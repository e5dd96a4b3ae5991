"""DDPM, DDIM and flow Euler against diffusers' schedulers (same float64 toy model, same initial and per-step noise),
and the properties that pin down the recipes diffusers cannot express."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from dcae.diffusion import (DiscreteSchedule, ddim_sample, ddpm_sample, flow_euler_sample, flow_euler_sigmas,
                            guided_denoiser, make_objective, sample, space_timesteps)

from .toy import ToyModel, assert_rel_close

SHAPE = (2, 3, 4, 4)
Y = torch.tensor([1, 3])
SEED = 7


def _fp64_alphas(scheduler, betas: torch.Tensor):
    """diffusers builds its betas in float32; give it the same recipe in float64 so only the algorithms differ."""
    scheduler.betas = betas.clone()
    scheduler.alphas = 1.0 - betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    return scheduler


def _linear_betas():
    return torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)


def _t(t, batch=SHAPE[0]):
    return torch.as_tensor(t, dtype=torch.float64).expand(batch)


@pytest.mark.parametrize("learn_sigma,variance_type", [(True, "learned_range"), (False, "fixed_large")])
def test_ddpm_matches_diffusers_on_dit_respacing(learn_sigma, variance_type):
    """Exact recipe: DiT's 25-step respacing (recomputed betas) given to `DDPMScheduler` as custom timesteps (its
    step uses abar of the previous kept timestep, i.e. the same recomputed beta), x0 not clipped, learned-range
    variance for a learn_sigma model (diffusers leaves the last step's log variance unclipped, but no noise is added
    there) or DiT's fixed large variance without. Both draw x_T, then each step's noise, from the same generator."""
    model = ToyModel(learn_sigma=learn_sigma)
    ours = sample(model.forward, SHAPE, Y, make_objective("eps", learn_sigma), "ddpm", steps=25,
                  generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)

    scheduler = _fp64_alphas(DDPMScheduler(variance_type=variance_type, clip_sample=False), _linear_betas())
    scheduler.set_timesteps(timesteps=space_timesteps(1000, 25)[::-1])
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(model.forward(x, _t(t), Y), t, x, generator=gen).prev_sample
    assert_rel_close(ours, x, 1e-10)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_matches_diffusers_on_leading_spacing(eta):
    """Nearest recipe: diffusers' DDIM steps from t to t - T // n, so it cannot follow DiT's respacing; both run on
    its "leading" timesteps {0, 100, ..., 900} (steps_offset 0, abar = 1 after the last step) with the same x_T and,
    for eta > 0, the same per-step noise (ours draws it from the generator, diffusers gets it as variance_noise;
    the last step adds none)."""
    model, steps = ToyModel(), 10
    scheduler = _fp64_alphas(DDIMScheduler(clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                           timestep_spacing="leading"), _linear_betas())
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    schedule = DiscreteSchedule.named("linear").respace(scheduler.timesteps.tolist())
    ours = ddim_sample(guided_denoiser(model.forward, Y, 1.0, False),
                       torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64),
                       schedule, eta, torch.Generator().manual_seed(SEED + 1))

    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    step_noise = torch.Generator().manual_seed(SEED + 1)
    for k, t in enumerate(scheduler.timesteps):
        noise = (torch.randn(SHAPE, generator=step_noise, dtype=torch.float64) if eta > 0 and k < steps - 1
                 else torch.zeros(SHAPE, dtype=torch.float64))
        x = scheduler.step(model.forward(x, _t(t), Y), t, x, eta=eta, variance_noise=noise).prev_sample
    assert_rel_close(ours, x, 1e-10)


@pytest.mark.parametrize("steps,shift", [(28, 3.0), (7, 1.0)])
def test_flow_euler_matches_diffusers(steps, shift):
    """Exact recipe: `FlowMatchEulerDiscreteScheduler(shift)` default grid (Sana's FlowEuler); the model sees
    t = 1000 s in both (diffusers' timesteps are float32, so agreement is to float32 precision)."""
    model = ToyModel()
    ours = sample(model.forward, SHAPE, Y, make_objective("flow", shift=shift), "flow-euler", steps=steps,
                  generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(scheduler.sigmas.double(), flow_euler_sigmas(steps, shift), rtol=1e-6, atol=1e-7)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(model.forward(x, _t(t), Y), t, x).prev_sample
    assert_rel_close(ours, x, 1e-5)


def test_respacing_to_every_step_is_plain_ddpm():
    """1000 of 1000 steps: the respaced betas are the training betas and `sample` is the textbook DDPM chain
    x_{i-1} = (x_i - beta_i / sqrt(1 - abar_i) eps) / sqrt(1 - beta_i) + sqrt(beta_i) z (z = 0 at i = 0)."""
    base = DiscreteSchedule.named("linear")
    respaced = base.respace(space_timesteps(1000, 1000))
    torch.testing.assert_close(respaced.betas, base.betas, rtol=1e-9, atol=0)
    torch.testing.assert_close(respaced.timestep_map, base.timestep_map, rtol=0, atol=0)

    model = ToyModel()
    ours = sample(model.forward, SHAPE, Y, make_objective("eps"), "ddpm", steps=1000,
                  generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    betas, abar = base.betas, base.alphas_cumprod
    for i in reversed(range(1000)):
        eps = model.forward(x, _t(i), Y)
        x = (x - betas[i] / (1 - abar[i]).sqrt() * eps) / (1 - betas[i]).sqrt()
        if i > 0:
            x = x + betas[i].sqrt() * torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    assert_rel_close(ours, x, 1e-9)


@pytest.mark.parametrize("v,fixed", [(1.0, "large"), (-1.0, "small")])
def test_learned_range_ends_are_the_fixed_variances(v, fixed):
    """v = +1 gives log(beta) (DiT's fixed large), v = -1 the clipped posterior variance (fixed small)."""
    model = ToyModel()
    schedule = DiscreteSchedule.named("linear").respace(space_timesteps(1000, 20))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)

    def learned(x, t):
        eps = model.forward(x, t, Y)
        return torch.cat([eps, torch.full_like(eps, v)], dim=1)

    out = ddpm_sample(learned, noise, schedule, "learned_range", torch.Generator().manual_seed(1))
    expected = ddpm_sample(lambda x, t: model.forward(x, t, Y), noise, schedule, fixed,
                           torch.Generator().manual_seed(1))
    assert_rel_close(out, expected, 1e-12)
    swapped = {"large": "small", "small": "large"}[fixed]
    other = ddpm_sample(lambda x, t: model.forward(x, t, Y), noise, schedule, swapped, torch.Generator().manual_seed(1))
    assert not torch.allclose(out, other)


def test_ddim_eta_one_is_ddpm_with_posterior_variance():
    """DDIM with eta = 1 samples the DDPM posterior: the same chain as ancestral sampling with the small
    (posterior) variance, given the same noise."""
    model = ToyModel()
    schedule = DiscreteSchedule.named("scaled_linear").respace(space_timesteps(1000, 15))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)
    denoise = guided_denoiser(model.forward, Y, 1.0, False)
    ddim = ddim_sample(denoise, noise, schedule, 1.0, torch.Generator().manual_seed(3))
    ddpm = ddpm_sample(denoise, noise, schedule, "small", torch.Generator().manual_seed(3))
    assert_rel_close(ddim, ddpm, 1e-10)


def test_flow_euler_integrates_a_straight_path_exactly():
    """For data x0 and the true velocity of the straight path through x0 (v = (x - x0) / s), Euler lands on x0."""
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = flow_euler_sample(lambda x, t: (x - x0) / (t.view(-1, 1, 1, 1) / 1000), noise,
                            flow_euler_sigmas(5, 3.0))
    assert_rel_close(out, x0, 1e-12)
