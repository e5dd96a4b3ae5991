"""Noise schedules: the discrete variance-preserving (DDPM) schedule, DiT's timestep respacing, and the sigma grids
of the samplers (DPM-Solver++ on DDPM timesteps, rectified flow with a timestep shift).

Conventions. DDPM: index ``i`` in 0..T-1 (T = 1000), ``x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps``,
``abar_i = prod_{j <= i} (1 - beta_j)``; the model sees ``t = timestep_map[i]`` (``i + time_offset``: DiT feeds
0..999, U-ViT / efficientvit 1..1000). Rectified flow: ``x_s = (1 - s) x0 + s noise``, s in [0, 1], the model sees
``t = 1000 s``. Schedules are float64 on the CPU; `gather` moves the values a batch needs.
"""
from collections.abc import Sequence

import numpy as np
import torch

NUM_TIMESTEPS = 1000
FLOW_TIME_SCALE = 1000.0  # a flow model sees t = 1000 s
BETA_SCHEDULES = ("linear", "scaled_linear")


def linear_betas(num_timesteps: int = NUM_TIMESTEPS, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """DDPM / DiT: ``linspace(start, end, T)``, float64."""
    return torch.from_numpy(np.linspace(start, end, num_timesteps, dtype=np.float64))


def scaled_linear_betas(num_timesteps: int = NUM_TIMESTEPS, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion / U-ViT: ``linspace(sqrt(start), sqrt(end), T) ** 2``, float64."""
    return torch.from_numpy(np.linspace(start ** 0.5, end ** 0.5, num_timesteps, dtype=np.float64) ** 2)


def gather(values: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[index]`` as (B, 1, ..., 1) to broadcast over ``like`` (B, ...), in ``like``'s dtype promoted to at
    least float32 (schedule coefficients are never rounded to bf16 / fp16)."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    out = values.to(index.device)[index].to(device=like.device, dtype=dtype)
    return out.view(-1, *([1] * (like.dim() - 1)))


class DiscreteSchedule:
    """A variance-preserving schedule over ``T = len(betas)`` steps (ADM / DiT's ``GaussianDiffusion``).

    Per step ``i`` (all (T,) float64): ``alphas_cumprod`` abar_i, ``alphas_cumprod_prev`` abar_{i-1} (1 at i = 0),
    the posterior q(x_{i-1} | x_i, x0) = N(coef1_i x0 + coef2_i x_i, posterior_variance_i) with
    ``posterior_variance = beta_i (1 - abar_{i-1}) / (1 - abar_i)`` and ``posterior_log_variance_clipped`` its log
    with step 0 (variance 0) replaced by step 1's, and ``timestep_map`` the model's t for each step.
    """

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.dim() != 1 or betas.numel() == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must be a non-empty 1-D tensor in (0, 1], got shape {tuple(betas.shape)}")
        self.betas = betas
        self.num_timesteps = betas.numel()
        if timestep_map is None:
            timestep_map = torch.arange(self.num_timesteps, dtype=torch.float64)
        self.timestep_map = torch.as_tensor(timestep_map, dtype=torch.float64).cpu()
        if self.timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map must have shape {tuple(betas.shape)}, got {tuple(self.timestep_map.shape)}")
        acp = torch.cumprod(1.0 - betas, dim=0)
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = acp, acp_prev
        self.posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        # DiT's FIXED_LARGE: beta_i, with step 0 taking step 1's posterior variance (only the decoder term sees it).
        self.large_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))
        self.posterior_mean_coef1 = betas * acp_prev.sqrt() / (1.0 - acp)
        self.posterior_mean_coef2 = (1.0 - acp_prev) * (1.0 - betas).sqrt() / (1.0 - acp)

    @classmethod
    def named(cls, name: str, num_timesteps: int = NUM_TIMESTEPS, time_offset: int = 0) -> "DiscreteSchedule":
        """``"linear"`` (DiT: 1e-4 -> 0.02) or ``"scaled_linear"`` (U-ViT: sqrt 0.00085 -> sqrt 0.012, squared)
        over ``num_timesteps``; the model sees ``t = i + time_offset``."""
        if name not in BETA_SCHEDULES:
            raise ValueError(f"schedule must be one of {BETA_SCHEDULES}, got {name!r}")
        betas = linear_betas(num_timesteps) if name == "linear" else scaled_linear_betas(num_timesteps)
        return cls(betas, torch.arange(num_timesteps, dtype=torch.float64) + time_offset)

    def respace(self, use_timesteps: Sequence[int]) -> "DiscreteSchedule":
        """The schedule that visits only ``use_timesteps`` (DiT's ``SpacedDiffusion``): the kept steps' abar are
        unchanged, so their betas are recomputed as ``1 - abar_k / abar_prev_kept``; the model still sees the
        original t of each kept step."""
        kept = sorted(set(int(i) for i in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{self.num_timesteps - 1}")
        acp = self.alphas_cumprod[kept]
        betas = 1.0 - acp / torch.cat([acp.new_ones(1), acp[:-1]])
        return DiscreteSchedule(betas, self.timestep_map[kept])

    def model_time(self, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The model's t (B,) for step indices (B,), as a float tensor on ``like``'s device (float32 or float64)."""
        dtype = torch.promote_types(like.dtype, torch.float32)
        return self.timestep_map.to(index.device)[index].to(device=like.device, dtype=dtype)

    def q_sample(self, x0: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) noise. x0, noise: (B, ...); index: (B,)."""
        acp = gather(self.alphas_cumprod, index, x0)
        return acp.sqrt() * x0 + (1.0 - acp).sqrt() * noise

    def predict_x0(self, x_t: torch.Tensor, index: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_i - sqrt(1 - abar_i) eps) / sqrt(abar_i)."""
        acp = gather(self.alphas_cumprod, index, x_t)
        return (x_t - (1.0 - acp).sqrt() * eps) / acp.sqrt()

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor):
        """Mean and clipped log variance of q(x_{i-1} | x_i, x0); the log variance is (B, 1, ..., 1)."""
        mean = gather(self.posterior_mean_coef1, index, x_t) * x0 + gather(self.posterior_mean_coef2, index, x_t) * x_t
        return mean, gather(self.posterior_log_variance_clipped, index, x_t)

    def p_log_variance(self, index: torch.Tensor, like: torch.Tensor, variance: str,
                       var_values: torch.Tensor | None = None) -> torch.Tensor:
        """log variance of p(x_{i-1} | x_i). ``variance``: ``"small"`` (the clipped posterior variance),
        ``"large"`` (beta_i) or ``"learned_range"``: ``frac log(beta_i) + (1 - frac) log(posterior_clipped_i)``
        with ``frac = (v + 1) / 2`` and ``var_values`` v (B, C, ...) the model's second half (DiT / IDDPM)."""
        small = gather(self.posterior_log_variance_clipped, index, like)
        if variance == "small":
            return small
        if variance == "large":
            return gather(self.large_log_variance, index, like)
        if variance == "learned_range":
            frac = (var_values + 1.0) / 2.0
            return frac * gather(self.betas.log(), index, like) + (1.0 - frac) * small
        raise ValueError(f"variance must be 'small', 'large' or 'learned_range', got {variance!r}")


def space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """DiT / ADM's ``space_timesteps(T, [count])``: ``count`` steps of 0..T-1, ``round(k (T - 1) / (count - 1))``
    for k = 0..count-1 accumulated by repeated addition as ADM does (first 0, last T - 1; ``count = 1`` keeps only 0).
    Ascending."""
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"count must be in [1, {num_timesteps}], got {count}")
    stride = 1 if count == 1 else (num_timesteps - 1) / (count - 1)
    steps, position = [], 0.0
    for _ in range(count):
        steps.append(round(position))
        position += stride
    return steps


def dpm_timesteps(steps: int, num_timesteps: int = NUM_TIMESTEPS) -> list[int]:
    """DPM-Solver++ on a discrete schedule as diffusers' `DPMSolverMultistepScheduler` (timestep_spacing
    "linspace"): ``round(linspace(0, T - 1, steps + 1))`` reversed, without the final 0 (the last step goes to
    sigma 0). Descending; ``steps <= T - 1`` so that no two coincide."""
    if not 1 <= steps <= num_timesteps - 1:
        raise ValueError(f"steps must be in [1, {num_timesteps - 1}] for DPM-Solver++, got {steps}")
    return np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64).tolist()


def shift_sigma(s, shift: float):
    """The timestep shift of SD3 / Sana: ``s' = shift s / (1 + (shift - 1) s)`` (maps [0, 1] onto itself, pushes
    s toward 1 = noise for shift > 1). Works on floats, numpy arrays and tensors."""
    return shift * s / (1 + (shift - 1) * s)


def flow_euler_sigmas(steps: int, shift: float, num_timesteps: int = NUM_TIMESTEPS) -> torch.Tensor:
    """(steps + 1,) float64 sigmas of Sana's flow Euler sampler = diffusers' `FlowMatchEulerDiscreteScheduler`
    (shift) default grid: ``u = linspace(1, shift_sigma(1 / T), steps)``, ``s = shift_sigma(u)``, then 0. (The low
    end is shifted twice, as in diffusers: its sigma_min is the shifted training sigma.)"""
    low = shift_sigma(1.0 / num_timesteps, shift)
    u = np.linspace(1.0, low, steps) if steps > 1 else np.ones(1)
    return torch.from_numpy(np.append(shift_sigma(u, shift), 0.0))


def flow_dpm_sigmas(steps: int, shift: float, num_timesteps: int = NUM_TIMESTEPS) -> torch.Tensor:
    """(steps + 1,) float64 sigmas of flow DPM-Solver++ = diffusers' `DPMSolverMultistepScheduler(use_flow_sigmas,
    flow_shift)`: ``s_k = shift_sigma((1 - 1 / T)(1 - k / steps))`` for k = 0..steps (the first is just under 1,
    the last 0)."""
    u = (1.0 - np.linspace(1.0, 1.0 / num_timesteps, steps + 1))[::-1].copy()
    return torch.from_numpy(shift_sigma(u, shift))

