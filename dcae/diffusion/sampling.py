"""`sample`: the one entry point that turns a model and class ids into latents.

- ``ddpm`` (eps, 250 steps by default, DiT): ancestral sampling on DiT's respacing `space_timesteps` (recomputed
  betas), the learned-range variance with learn_sigma, else DiT's fixed large variance.
- ``ddim`` (eps, 50): the same respacing; ``eta`` in [0, 1] (0: deterministic).
- ``dpm++2`` / ``dpm++3`` (eps, 30, U-ViT): multistep DPM-Solver++ of order 2 / 3 on diffusers' time-uniform grid
  of integer timesteps `dpm_timesteps`.
- ``flow-euler`` (flow, 28, Sana's FlowEuler): Euler on diffusers' `FlowMatchEulerDiscreteScheduler` grid with the
  objective's shift.
- ``flow-dpm++`` (flow, 20, Sana's flow DPM-Solver): DPM-Solver++ of order 2 on diffusers' flow sigmas with the
  objective's shift.

Guidance: see guidance.py (``cfg_scale`` 1 = one plain forward per step).
"""
import math

import torch
from torch import nn

from .dpm_solver import dpm_solver_pp_sample, flow_dpm_solver_pp_sample
from .guidance import guided_denoiser
from .objectives import EpsObjective, FlowObjective, Objective
from .rng import randn
from .samplers import ddim_sample, ddpm_sample, flow_euler_sample
from .schedules import flow_dpm_sigmas, flow_euler_sigmas, space_timesteps

SAMPLERS = ("ddpm", "ddim", "dpm++2", "dpm++3", "flow-euler", "flow-dpm++")
FLOW_SAMPLERS = ("flow-euler", "flow-dpm++")
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "dpm++2": 30, "dpm++3": 30, "flow-euler": 28, "flow-dpm++": 20}


def check_sample_args(objective: Objective, sampler: str, steps: int | None = None, cfg_scale: float = 1.0,
                      eta: float = 0.0) -> int:
    """Raise the one-line ValueError `sample` raises for arguments that do not fit together (a CLI can call it
    before loading anything); return the number of steps (``steps`` None: the sampler's default)."""
    if not isinstance(objective, (EpsObjective, FlowObjective)):
        raise ValueError(f"objective must be an EpsObjective or FlowObjective (see make_objective), got "
                         f"{type(objective).__name__}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = DEFAULT_STEPS[sampler] if steps is None else steps
    if (sampler in FLOW_SAMPLERS) != (objective.kind == "flow"):
        fitting = FLOW_SAMPLERS if objective.kind == "flow" else tuple(s for s in SAMPLERS if s not in FLOW_SAMPLERS)
        raise ValueError(f"sampler {sampler!r} does not fit a {objective.kind!r} model; use one of "
                         f"{', '.join(fitting)}")
    most = objective.num_timesteps - 1 if sampler.startswith("dpm++") else objective.num_timesteps
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= most:
        raise ValueError(f"steps must be an int in [1, {most}] for {sampler}, got {steps!r}")
    if not (isinstance(cfg_scale, (int, float)) and math.isfinite(cfg_scale) and cfg_scale >= 0):
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if eta != 0.0 and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only, not to {sampler}")
    return steps


@torch.no_grad()
def sample(model, shape: tuple[int, ...], y: torch.Tensor, objective: Objective, sampler: str = "ddpm",
           steps: int | None = None, cfg_scale: float = 1.0, generator: torch.Generator | None = None,
           progress: bool = False, eta: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sample latents (B, C, H, W) = ``shape`` for classes ``y`` (B,) on ``y``'s device, in ``dtype``.

    ``model``: ``model(x, t, y)`` or an object with ``forward`` / ``forward_with_cfg`` (guidance.py), in eval
    mode, trained with ``objective`` (the same `make_objective` config: it fixes the schedule, learn_sigma and the
    flow shift). ``sampler``: one of `SAMPLERS` (table above); ``steps`` None takes `DEFAULT_STEPS`;
    ``cfg_scale`` w: ``uncond + w (cond - uncond)``, 1 = unguided; ``eta``: DDIM only. The initial noise, then
    each step's noise, come from ``generator`` (the global RNG if None), so a seeded generator gives the same
    latents. Returns the final latents, still multiplied by the autoencoder's scaling factor.
    Raises a one-line ValueError for arguments that do not fit (unknown sampler, steps out of range, negative
    cfg_scale, a flow sampler for an eps model or the reverse, a model that cannot be guided).
    """
    steps = check_sample_args(objective, sampler, steps, cfg_scale, eta)
    if len(shape) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"shape must be (B, C, H, W) of positive ints, got {tuple(shape)!r}")
    if y.dim() != 1 or y.shape[0] != shape[0] or y.is_floating_point():
        raise ValueError(f"y must be ({shape[0]},) integer class ids, got {tuple(y.shape)} {y.dtype}")
    if isinstance(model, nn.Module) and model.training:
        raise ValueError("model is in training mode (its class dropout would drop labels): call model.eval() first")
    denoise = guided_denoiser(model, y, float(cfg_scale), objective.learn_sigma)
    x = randn(shape, generator, y.device, dtype)
    if isinstance(objective, FlowObjective):
        if sampler == "flow-euler":
            return flow_euler_sample(denoise, x, flow_euler_sigmas(steps, objective.shift), progress)
        return flow_dpm_solver_pp_sample(denoise, x, flow_dpm_sigmas(steps, objective.shift), 2, progress)
    schedule = objective.schedule
    if sampler.startswith("dpm++"):
        return dpm_solver_pp_sample(denoise, x, schedule, steps, int(sampler[-1]), progress)
    respaced = schedule.respace(space_timesteps(schedule.num_timesteps, steps))
    if sampler == "ddim":
        return ddim_sample(denoise, x, respaced, eta, generator, progress)
    return ddpm_sample(denoise, x, respaced, "learned_range" if objective.learn_sigma else "large", generator,
                       progress)
