"""DPM-Solver++ (discrete eps models and flow models) against diffusers' `DPMSolverMultistepScheduler`."""
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from dcae.diffusion import dpm_solver_pp, dpm_timesteps, flow_dpm_sigmas, make_objective, sample

from .toy import ToyModel, assert_rel_close

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers
SHAPE = (2, 3, 4, 4)
Y = torch.tensor([0, 2])
SEED = 11
BETAS = {"linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
         "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)}


def _fp64_betas(schedule: str) -> torch.Tensor:
    if schedule == "linear":
        return torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2


def _noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)


@pytest.mark.parametrize("schedule,order,steps", [("linear", 2, 30), ("scaled_linear", 3, 30),
                                                  ("linear", 3, 10), ("scaled_linear", 2, 6)])
def test_dpm_solver_pp_matches_diffusers(schedule, order, steps):
    """Exact recipe: diffusers' default `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order,
    timestep_spacing="linspace", final_sigmas_type="zero", lower_order_final=True)` for an eps model (10 and 6
    steps exercise the lower orders near the end). diffusers steps in float32, hence the 1e-5 tolerance."""
    model = ToyModel()
    ours = sample(model.forward, SHAPE, Y, make_objective("eps", schedule=schedule), f"dpm++{order}", steps=steps,
                  generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)

    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=order, **BETAS[schedule])
    scheduler.alphas_cumprod = torch.cumprod(1.0 - _fp64_betas(schedule), dim=0)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == dpm_timesteps(steps)
    x = _noise()
    for t in scheduler.timesteps:
        x = scheduler.step(model.forward(x, t.double().expand(SHAPE[0]), Y), t, x).prev_sample
    assert_rel_close(ours, x, 1e-5)


@pytest.mark.parametrize("steps,shift", [(20, 3.0), (9, 2.0)])
def test_flow_dpm_solver_pp_matches_diffusers(steps, shift):
    """Exact solver and grid: `DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift, prediction_type=
    "flow_prediction", solver_order=2)`. diffusers hands a pipeline int64 timesteps (floor(1000 s)) while we give
    the model t = 1000 s, so the diffusers loop here also calls the model at 1000 * its own sigma."""
    model = ToyModel()
    ours = sample(model.forward, SHAPE, Y, make_objective("flow", shift=shift), "flow-dpm++", steps=steps,
                  generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)

    scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                                            flow_shift=shift, prediction_type="flow_prediction")
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(scheduler.sigmas.double(), flow_dpm_sigmas(steps, shift), rtol=1e-6, atol=1e-7)
    x = _noise()
    for k, t in enumerate(scheduler.timesteps):
        model_t = (1000 * scheduler.sigmas[k]).double().expand(SHAPE[0])
        x = scheduler.step(model.forward(x, model_t, Y), t, x).prev_sample
    assert_rel_close(ours, x, 1e-5)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_pp_follows_the_exact_path_of_a_constant_data_prediction(order):
    """If the model predicts x0 = c everywhere, the ODE keeps eps = (x - alpha c) / sigma constant:
    x_k = alpha_k c + sigma_k (x_0 - alpha_0 c) / sigma_0 at every grid point, for every order."""
    c = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alphas = [0.05, 0.3, 0.6, 0.8, 0.9, 0.95, 1.0]
    sigmas = [(1 - a * a) ** 0.5 for a in alphas]
    x_start, seen = _noise(), []
    out = dpm_solver_pp(lambda x, k: seen.append(x) or c, x_start, alphas, sigmas, order)
    eps = (x_start - alphas[0] * c) / sigmas[0]
    assert len(seen) == len(alphas) - 1
    for k, x in enumerate(seen):
        assert_rel_close(x, alphas[k] * c + sigmas[k] * eps, 1e-12)
    assert_rel_close(out, c, 1e-12)


def test_dpm_solver_pp_rejects_a_bad_grid():
    with pytest.raises(ValueError, match="sigmas"):
        dpm_solver_pp(lambda x, k: x, _noise(), [0.5, 1.0], [0.5, 0.1], 2)
    with pytest.raises(ValueError, match="order"):
        dpm_solver_pp(lambda x, k: x, _noise(), [0.5, 1.0], [0.5, 0.0], 4)
