"""Training objectives: oracle models, the VB term against a direct computation, what the VB term trains, the
timestep distributions, determinism and `make_objective`'s checks."""
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from dcae.diffusion import EpsObjective, FlowObjective, make_objective

B, C, H, W = 4, 3, 4, 4
F64 = torch.float64


def _x0(seed=0, batch=B):
    return torch.rand(batch, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=F64) * 1.8 - 0.9


def _y(batch=B):
    return torch.arange(batch) % 3


def _betas(schedule):
    if schedule == "linear":
        return torch.from_numpy(np.linspace(1e-4, 0.02, 1000))
    return torch.from_numpy(np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)


@pytest.mark.parametrize("schedule,time_offset", [("linear", 0), ("scaled_linear", 1)])
def test_eps_oracle_has_zero_loss(schedule, time_offset):
    """A model that returns the true noise (recovered from x_t and the x0 it knows) has zero loss; the model sees
    integer t in [offset, 999 + offset]."""
    x0, seen = _x0(), []
    abar = torch.cumprod(1 - _betas(schedule), 0)

    def oracle(x_t, t, y):
        seen.append(t)
        a = abar[(t - time_offset).long()].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    objective = make_objective("eps", schedule=schedule, time_offset=time_offset)
    loss, parts = objective.loss(oracle, x0, _y(), torch.Generator().manual_seed(0))
    assert loss.item() < 1e-20 and set(parts) == {"mse"} and parts["mse"] < 1e-12
    t = seen[0]
    assert t.dtype == F64 and torch.equal(t, t.round()) and time_offset <= t.min() and t.max() <= 999 + time_offset


def test_flow_oracle_has_zero_loss():
    """The true velocity noise - x0 = (x_t - x0) / s, with s = t / 1000, has zero loss; t lies in (0, 1000)."""
    x0, seen = _x0(), []

    def oracle(x_t, t, y):
        seen.append(t)
        return (x_t - x0) / (t / 1000).view(-1, 1, 1, 1)

    loss, parts = make_objective("flow").loss(oracle, x0, _y(), torch.Generator().manual_seed(0))
    assert loss.item() < 1e-20 and set(parts) == {"mse"}
    assert 0 < seen[0].min() and seen[0].max() < 1000


def _direct_vb(x0, x_t, index, eps, v):
    """The VB term from the textbook formulas and torch.distributions (bits per dim); the decoder term with the
    exact normal CDF."""
    betas = _betas("linear")
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    post_var = betas * (1 - abar_prev) / (1 - abar)
    out = []
    for b, i in enumerate(index.tolist()):
        def posterior_mean(start):
            return (betas[i] * abar_prev[i].sqrt() * start + (1 - abar_prev[i]) * (1 - betas[i]).sqrt() * x_t[b]) \
                / (1 - abar[i])
        model_mean = posterior_mean((x_t[b] - (1 - abar[i]).sqrt() * eps[b]) / abar[i].sqrt())
        frac = (v[b] + 1) / 2
        model_std = torch.exp(0.5 * (frac * betas[i].log() + (1 - frac) * post_var[max(i, 1)].log()))
        if i > 0:
            kl = kl_divergence(Normal(posterior_mean(x0[b]), post_var[i].sqrt()), Normal(model_mean, model_std))
            out.append(kl.mean() / math.log(2))
        else:
            p = Normal(model_mean, model_std)
            mass = p.cdf(x0[b] + 1 / 255) - p.cdf(x0[b] - 1 / 255)
            out.append(-mass.log().mean() / math.log(2))
    return torch.stack(out)


def test_vb_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(3)
    x0, x_t = _x0(1, 6), torch.randn(6, C, H, W, generator=gen, dtype=F64)
    eps, v = torch.randn(6, C, H, W, generator=gen, dtype=F64), torch.rand(6, C, H, W, generator=gen, dtype=F64) * 2 - 1
    index = torch.tensor([0, 1, 7, 250, 998, 999])
    # Step 0's decoder term needs a model mean near x0 (else the bin mass underflows): x_t from x0, eps nearly right.
    abar0 = 1 - 1e-4
    x_t[0] = abar0 ** 0.5 * x0[0] + (1 - abar0) ** 0.5 * eps[0] + 0.003 * torch.randn(C, H, W, generator=gen, dtype=F64)
    ours = EpsObjective("linear", learn_sigma=True).vb(x0, x_t, index, eps, v)
    direct = _direct_vb(x0, x_t, index, eps, v)
    torch.testing.assert_close(ours[1:], direct[1:], rtol=1e-9, atol=1e-12)
    # Step 0 is the decoder NLL with ADM's tanh approximation of the normal CDF (hence the looser tolerance).
    torch.testing.assert_close(ours[:1], direct[:1], rtol=1e-2, atol=0)


def test_vb_is_zero_for_the_true_posterior_and_positive_otherwise():
    """True eps and v = -1 (the posterior variance) give KL 0; v = +1 (beta) gives the closed-form
    0.5 (log(beta / pv) + pv / beta - 1) / ln 2 per dimension."""
    objective = EpsObjective("linear", learn_sigma=True)
    s = objective.schedule
    x0, noise = _x0(2), torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(4), dtype=F64)
    index = torch.tensor([1, 10, 500, 999])
    x_t = s.q_sample(x0, index, noise)
    zero = objective.vb(x0, x_t, index, noise, -torch.ones_like(noise))
    torch.testing.assert_close(zero, torch.zeros(B, dtype=F64), rtol=0, atol=1e-12)
    beta, pv = s.betas[index], s.posterior_variance[index]
    expected = 0.5 * (torch.log(beta / pv) + pv / beta - 1) / math.log(2)
    torch.testing.assert_close(objective.vb(x0, x_t, index, noise, torch.ones_like(noise)), expected, rtol=1e-9,
                               atol=1e-14)


def test_vb_trains_only_the_variance():
    """With learn_sigma the gradient reaching the eps half is the MSE's alone (the VB term sees eps detached);
    the variance half gets a gradient."""
    x0 = _x0()
    out = torch.randn(B, 2 * C, H, W, generator=torch.Generator().manual_seed(5), dtype=F64).requires_grad_()
    loss, parts = make_objective("eps", learn_sigma=True).loss(lambda x, t, y: out * 1.0, x0, _y(),
                                                               torch.Generator().manual_seed(6))
    assert set(parts) == {"mse", "vb"} and loss.item() == pytest.approx(parts["mse"] + parts["vb"], rel=1e-6)
    loss.backward()
    eps = out.detach()[:, :C].clone().requires_grad_()
    mse_only, _ = make_objective("eps").loss(lambda x, t, y: eps * 1.0, x0, _y(), torch.Generator().manual_seed(6))
    mse_only.backward()
    torch.testing.assert_close(out.grad[:, :C], eps.grad, rtol=1e-12, atol=0)
    assert out.grad[:, C:].abs().sum() > 0


@pytest.mark.parametrize("kind", ["eps", "flow"])
def test_loss_is_deterministic_given_the_generator(kind):
    objective = make_objective(kind)
    weight = torch.randn(C, C, generator=torch.Generator().manual_seed(0), dtype=F64)

    def model(x, t, y):
        return torch.einsum("oc,bchw->bohw", weight, x) * torch.cos(t / 400).view(-1, 1, 1, 1)

    first = objective.loss(model, _x0(), _y(), torch.Generator().manual_seed(9))
    again = objective.loss(model, _x0(), _y(), torch.Generator().manual_seed(9))
    other = objective.loss(model, _x0(), _y(), torch.Generator().manual_seed(10))
    assert first[0].item() == again[0].item() and first[1] == again[1]
    assert first[0].item() != other[0].item()


@pytest.mark.parametrize("shift,mean,std", [(3.0, 0.0, 1.0), (1.0, 0.0, 1.0), (2.0, 0.5, 0.8)])
def test_flow_timesteps_are_shifted_logit_normal(shift, mean, std):
    """Empirical quantiles of 100k draws against shift_sigma(sigmoid(mean + std Phi^-1(q)))."""
    objective = FlowObjective(shift, mean, std)
    s = objective.sample_sigma(100_000, torch.Generator().manual_seed(0), "cpu", F64)
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=F64)
    u = torch.sigmoid(mean + std * math.sqrt(2) * torch.erfinv(2 * q - 1))
    expected = shift * u / (1 + (shift - 1) * u)
    torch.testing.assert_close(torch.quantile(s, q), expected, rtol=0, atol=4e-3)
    assert 0 < s.min() and s.max() < 1


def test_eps_timesteps_are_uniform():
    index = EpsObjective().sample_index(100_000, torch.Generator().manual_seed(0), "cpu")
    assert index.min() == 0 and index.max() == 999
    counts = torch.bincount(index // 100, minlength=10).double() / index.numel()
    torch.testing.assert_close(counts, torch.full((10,), 0.1, dtype=F64), rtol=0, atol=5e-3)


def test_schedules_are_the_recipes():
    dit, uvit = EpsObjective("linear").schedule, EpsObjective("scaled_linear").schedule
    assert dit.betas[0].item() == pytest.approx(1e-4) and dit.betas[-1].item() == pytest.approx(0.02)
    assert uvit.betas[0].item() == pytest.approx(0.00085) and uvit.betas[-1].item() == pytest.approx(0.012)
    assert uvit.betas[500].sqrt().item() == pytest.approx((0.00085 ** 0.5 + 0.012 ** 0.5) / 2, rel=1e-3)


def test_model_output_shape_is_checked():
    with pytest.raises(ValueError, match="expects"):
        make_objective("eps", learn_sigma=True).loss(lambda x, t, y: x, _x0(), _y())
    with pytest.raises(ValueError, match="y must have shape"):
        make_objective("flow").loss(lambda x, t, y: x, _x0(), _y(B + 1))


def test_make_objective_config_round_trip_and_errors():
    for objective in (make_objective("eps", True, "scaled_linear", time_offset=1), make_objective("flow", shift=2.0)):
        assert make_objective(**objective.config).config == objective.config
    assert make_objective("eps").config == dict(kind="eps", learn_sigma=False, schedule="linear", time_offset=0)
    assert make_objective("flow").config == dict(kind="flow", shift=3.0, logit_mean=0.0, logit_std=1.0)
    for kwargs, match in [(dict(kind="v"), "kind"), (dict(kind="flow", learn_sigma=True), "learn_sigma"),
                          (dict(kind="eps", shift=3.0), "shift"), (dict(kind="eps", schedule="cosine"), "schedule"),
                          (dict(kind="flow", schedule="linear"), "schedule"), (dict(kind="flow", shift=0.0), "shift"),
                          (dict(kind="eps", time_offset=-1), "time_offset")]:
        with pytest.raises(ValueError, match=match):
            make_objective(**kwargs)
