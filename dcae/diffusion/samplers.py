"""DDPM ancestral, DDIM and flow Euler samplers over ``denoise(x, t) -> model output`` (see guidance.py).

Each takes the initial noise ``x`` (B, C, H, W) and returns the final x0 latents in ``x``'s dtype; per-step noise
is drawn from ``generator`` (`rng.randn`, shape and dtype of x) only on the steps that add noise, in step order.
"""
import math

import torch
from tqdm import tqdm

from .guidance import Denoise
from .rng import randn
from .schedules import FLOW_TIME_SCALE, DiscreteSchedule

VARIANCES = ("large", "small", "learned_range")


def _steps(n: int, progress: bool, desc: str, reverse: bool):
    order = reversed(range(n)) if reverse else range(n)
    return tqdm(order, total=n, desc=desc, disable=not progress)


def ddpm_sample(denoise: Denoise, x: torch.Tensor, schedule: DiscreteSchedule, variance: str = "large",
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling over every step of ``schedule`` (pass ``schedule.respace(space_timesteps(T, n))`` for
    DiT's n-step sampler; the model sees each kept step's original t). Step i: x0 = (x - sqrt(1 - abar_i) eps) /
    sqrt(abar_i) (not clipped), mean = coef1_i x0 + coef2_i x, ``x <- mean + exp(log_var / 2) z`` with the log
    variance of ``variance`` (`DiscreteSchedule.p_log_variance`; "learned_range" reads the model's second half),
    and no noise at the last step (i = 0)."""
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    channels = x.shape[1]
    for i in _steps(schedule.num_timesteps, progress, "ddpm", reverse=True):
        index = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        out = denoise(x, schedule.model_time(index, x))
        x0 = schedule.predict_x0(x, index, out[:, :channels])
        mean, _ = schedule.q_posterior(x0, x, index)
        if i > 0:
            var_values = out[:, channels:] if variance == "learned_range" else None
            log_var = schedule.p_log_variance(index, x, variance, var_values)
            mean = mean + torch.exp(0.5 * log_var) * randn(x.shape, generator, x.device, x.dtype)
        x = mean.to(x.dtype)
    return x


def ddim_sample(denoise: Denoise, x: torch.Tensor, schedule: DiscreteSchedule, eta: float = 0.0,
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM over every step of ``schedule`` (respaced as for `ddpm_sample`), from abar_i to abar_prev (1 after the
    last step): x0 = (x - sqrt(1 - abar_i) eps) / sqrt(abar_i), ``sigma = eta sqrt((1 - abar_prev) / (1 - abar_i))
    sqrt(1 - abar_i / abar_prev)``, ``x <- sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z``.
    eta = 0 is deterministic, 1 has DDPM's posterior variance; noise is drawn only where sigma > 0. A learn_sigma
    model's variance half is unused."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    channels = x.shape[1]
    for i in _steps(schedule.num_timesteps, progress, "ddim", reverse=True):
        index = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        eps = denoise(x, schedule.model_time(index, x))[:, :channels]
        a_t, a_prev = schedule.alphas_cumprod[i].item(), schedule.alphas_cumprod_prev[i].item()
        x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
        x_next = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma ** 2, 0.0)) * eps
        if sigma > 0:
            x_next = x_next + sigma * randn(x.shape, generator, x.device, x.dtype)
        x = x_next.to(x.dtype)
    return x


def flow_euler_sample(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Euler steps of the flow ODE dx/ds = v over ``sigmas`` (n + 1,) from noise to s = 0 (see
    `schedules.flow_euler_sigmas`): ``x <- x + (s_{k+1} - s_k) v(x, t = 1000 s_k)``."""
    sigmas = sigmas.tolist()
    for k in _steps(len(sigmas) - 1, progress, "flow-euler", reverse=False):
        t = torch.full((x.shape[0],), FLOW_TIME_SCALE * sigmas[k], device=x.device,
                       dtype=torch.promote_types(x.dtype, torch.float32))
        x = (x + (sigmas[k + 1] - sigmas[k]) * denoise(x, t)).to(x.dtype)
    return x
