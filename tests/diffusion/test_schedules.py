"""Schedules: DiT's respacing rule, the posterior by Bayes' rule, the timestep shift and the sampler grids."""
import pytest
import torch

from dcae.diffusion import (DiscreteSchedule, dpm_timesteps, flow_dpm_sigmas, flow_euler_sigmas, shift_sigma,
                            space_timesteps)


def test_space_timesteps_is_dits_rule():
    """Values of DiT's space_timesteps(1000, [n]) (checked against its code for every n in 1..1000)."""
    steps = space_timesteps(1000, 250)
    assert len(steps) == 250 and steps[:5] == [0, 4, 8, 12, 16] and steps[-3:] == [991, 995, 999]
    assert space_timesteps(1000, 10) == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    # 10 * 999 / 20 = 499.5 accumulated by repeated addition rounds to 499 (np.linspace(0, 999, 21) gives 500).
    assert space_timesteps(1000, 21)[8:13] == [400, 450, 499, 549, 599]
    assert space_timesteps(1000, 1) == [0]
    assert space_timesteps(1000, 1000) == list(range(1000))
    for count in (0, 1001):
        with pytest.raises(ValueError, match="count"):
            space_timesteps(1000, count)


def test_respace_keeps_alphas_cumprod_and_model_times():
    base = DiscreteSchedule.named("scaled_linear", time_offset=1)
    kept = space_timesteps(1000, 7)
    respaced = base.respace(kept)
    torch.testing.assert_close(respaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    assert respaced.timestep_map.tolist() == [k + 1.0 for k in kept]
    with pytest.raises(ValueError, match="use_timesteps"):
        base.respace([0, 1000])


def test_posterior_is_bayes_rule():
    """q(x_{i-1} | x_i, x0) from q(x_{i-1} | x0) = N(sqrt(abar_{i-1}) x0, 1 - abar_{i-1}) and
    q(x_i | x_{i-1}) = N(sqrt(alpha_i) x_{i-1}, beta_i)."""
    s = DiscreteSchedule.named("linear")
    index = torch.tensor([1, 40, 600, 999])
    x0, x_t = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    a_prev, beta = s.alphas_cumprod_prev[index, None], s.betas[index, None]
    var = 1 / (1 / (1 - a_prev) + (1 - beta) / beta)
    mean = var * (a_prev.sqrt() * x0 / (1 - a_prev) + (1 - beta).sqrt() * x_t / beta)
    ours_mean, ours_log_var = s.q_posterior(x0, x_t, index)
    torch.testing.assert_close(ours_mean, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_log_var.exp(), var, rtol=1e-10, atol=0)
    # Step 0's variance is 0; its clipped log takes step 1's.
    assert s.posterior_variance[0] == 0 and s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]


def test_bad_betas_are_refused():
    for betas in (torch.tensor([0.1, 0.0]), torch.tensor([1.5]), torch.zeros(0)):
        with pytest.raises(ValueError, match="betas"):
            DiscreteSchedule(betas)
    with pytest.raises(ValueError, match="schedule"):
        DiscreteSchedule.named("cosine")


def test_shift_sigma():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(s, 1.0), s)
    shifted = shift_sigma(s, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted[1:-1] > s[1:-1]).all())
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    torch.testing.assert_close(shift_sigma(shifted, 1 / 3.0), s)


def test_sampler_grids():
    assert dpm_timesteps(30)[:3] == [999, 966, 932] and dpm_timesteps(30)[-1] == 33 and len(dpm_timesteps(30)) == 30
    assert dpm_timesteps(999) == list(range(999, 0, -1))
    with pytest.raises(ValueError, match="steps"):
        dpm_timesteps(1000)
    euler, dpm = flow_euler_sigmas(28, 3.0), flow_dpm_sigmas(20, 3.0)
    assert euler.shape == (29,) and euler[0] == 1 and euler[-1] == 0
    assert euler[-2].item() == pytest.approx(shift_sigma(shift_sigma(1e-3, 3.0), 3.0))
    assert dpm.shape == (21,) and dpm[0].item() == pytest.approx(shift_sigma(0.999, 3.0)) and dpm[-1] == 0
    assert dpm[10].item() == pytest.approx(shift_sigma(0.999 / 2, 3.0))
    for grid in (euler, dpm):
        assert bool((grid[1:] < grid[:-1]).all())
    assert flow_euler_sigmas(1, 3.0).tolist() == [1.0, 0.0]
