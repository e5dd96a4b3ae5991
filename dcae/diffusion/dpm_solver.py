"""Multistep DPM-Solver++ (Lu et al. 2022; data prediction, "midpoint" second order) on a grid of (alpha_k, sigma_k)
with x_k = alpha_k x0 + sigma_k noise, lambda_k = log(alpha_k / sigma_k), ending at sigma = 0. Step for step the
update of diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", final_sigmas_type="zero",
lower_order_final=True)`: the first step is first order, the second at most second order, the last step is
first order (it returns the x0 prediction), and with fewer than 15 steps the one before it is at most second order.
"""
import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from .guidance import Denoise
from .schedules import FLOW_TIME_SCALE, DiscreteSchedule, dpm_timesteps


def _step_order(k: int, steps: int, order: int) -> int:
    if k == 0 or k == steps - 1:
        return 1
    if k == 1 or (k == steps - 2 and steps < 15):
        return min(order, 2)
    return order


def dpm_solver_pp(to_x0: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor, alphas: list[float],
                  sigmas: list[float], order: int = 2, progress: bool = False, desc: str = "dpm++") -> torch.Tensor:
    """Integrate from ``x`` at grid point 0 to the last point (sigma 0) in ``len(alphas) - 1`` steps;
    ``to_x0(x, k)`` is the model's x0 prediction at grid point k. With h = lambda_{k+1} - lambda_k, r_j the ratio
    of the previous steps' h to h, and D the differences of the last x0 predictions m0, m1, m2:
    ``x <- (sigma_{k+1} / sigma_k) x - alpha_{k+1} (e^-h - 1) D0 + [2nd] -0.5 alpha_{k+1} (e^-h - 1) D1
    | [3rd] + alpha_{k+1} ((e^-h - 1) / h + 1) D1 - alpha_{k+1} ((e^-h - 1 + h) / h^2 - 0.5) D2``."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if len(alphas) != len(sigmas) or len(sigmas) < 2 or sigmas[-1] != 0 or any(s <= 0 for s in sigmas[:-1]):
        raise ValueError("alphas and sigmas must be grids of equal length >= 2, sigmas positive and ending at 0")
    steps = len(alphas) - 1
    lambdas = [math.log(a) - math.log(s) for a, s in zip(alphas[:-1], sigmas[:-1])]
    history: list[torch.Tensor] = []  # x0 predictions of the last steps, newest last
    for k in tqdm(range(steps), desc=desc, disable=not progress):
        history = (history + [to_x0(x, k)])[-3:]
        if k < steps - 1:
            x = _update(x, history, k, _step_order(k, steps, order), alphas, sigmas, lambdas).to(x.dtype)
    return (alphas[-1] * history[-1]).to(x.dtype)  # the last, first-order step to sigma = 0: alpha_last x0


def _update(x, history, k, step_order, alphas, sigmas, lambdas):
    m0, h, a_next = history[-1], lambdas[k + 1] - lambdas[k], alphas[k + 1]
    x_next = (sigmas[k + 1] / sigmas[k]) * x - a_next * math.expm1(-h) * m0
    if step_order == 1:
        return x_next
    r0 = (lambdas[k] - lambdas[k - 1]) / h
    if step_order == 2:
        return x_next - 0.5 * a_next * math.expm1(-h) * (m0 - history[-2]) / r0
    r1 = (lambdas[k - 1] - lambdas[k - 2]) / h
    d1_0, d1_1 = (m0 - history[-2]) / r0, (history[-2] - history[-3]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return x_next + a_next * (math.expm1(-h) / h + 1.0) * d1 - a_next * ((math.expm1(-h) + h) / h ** 2 - 0.5) * d2


def dpm_solver_pp_sample(denoise: Denoise, x: torch.Tensor, schedule: DiscreteSchedule, steps: int = 30,
                         order: int = 2, progress: bool = False) -> torch.Tensor:
    """DPM-Solver++ for an eps model on a discrete schedule, on diffusers' default grid: the integer steps
    `schedules.dpm_timesteps` (round(linspace(0, T - 1, steps + 1)), time-uniform, not DPM-Solver's logSNR-uniform
    grid), alpha_k = sqrt(abar), sigma_k = sqrt(1 - abar), then sigma = 0; x0 = (x - sigma_k eps) / alpha_k
    (a learn_sigma model's variance half is unused)."""
    index = dpm_timesteps(steps, schedule.num_timesteps)
    acp = schedule.alphas_cumprod[index].tolist()
    alphas, sigmas = [math.sqrt(a) for a in acp] + [1.0], [math.sqrt(1.0 - a) for a in acp] + [0.0]
    channels = x.shape[1]

    def to_x0(x_k, k):
        i = torch.full((x_k.shape[0],), index[k], dtype=torch.long, device=x_k.device)
        eps = denoise(x_k, schedule.model_time(i, x_k))[:, :channels]
        return (x_k - sigmas[k] * eps) / alphas[k]

    return dpm_solver_pp(to_x0, x, alphas, sigmas, order, progress, f"dpm++{order}")


def flow_dpm_solver_pp_sample(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, order: int = 2,
                              progress: bool = False) -> torch.Tensor:
    """DPM-Solver++ for a flow (velocity) model over ``sigmas`` (n + 1,) ending at 0 (see
    `schedules.flow_dpm_sigmas`): alpha = 1 - s, x0 = x - s v(x, t = 1000 s)."""
    sigmas = sigmas.tolist()

    def to_x0(x_k, k):
        t = torch.full((x_k.shape[0],), FLOW_TIME_SCALE * sigmas[k], device=x_k.device,
                       dtype=torch.promote_types(x_k.dtype, torch.float32))
        return x_k - sigmas[k] * denoise(x_k, t)

    return dpm_solver_pp(to_x0, x, [1.0 - s for s in sigmas], sigmas, order, progress, f"flow-dpm++{order}")
