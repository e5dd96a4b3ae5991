"""Diffusion on autoencoder latents: noise schedules, training objectives, samplers and classifier-free guidance.

A trainer: ``objective = make_objective(kind, learn_sigma, schedule, ...)``, then per batch
``loss, parts = objective.loss(model, x0, y, generator)``. A sampler / CLI: ``sample(model, shape, y, objective,
sampler, steps, cfg_scale, generator)`` with the objective rebuilt from the same config (``objective.config``).
Timesteps the model sees: eps objectives t = step index (0..999, + time_offset), flow objectives t = 1000 s.
"""
from .dpm_solver import dpm_solver_pp, dpm_solver_pp_sample, flow_dpm_solver_pp_sample
from .guidance import guided_denoiser
from .objectives import EpsObjective, FlowObjective, Objective, make_objective
from .samplers import ddim_sample, ddpm_sample, flow_euler_sample
from .sampling import DEFAULT_STEPS, SAMPLERS, check_sample_args, sample
from .schedules import (DiscreteSchedule, dpm_timesteps, flow_dpm_sigmas, flow_euler_sigmas, shift_sigma,
                        space_timesteps)

__all__ = ["DEFAULT_STEPS", "DiscreteSchedule", "EpsObjective", "FlowObjective", "Objective", "SAMPLERS",
           "check_sample_args", "ddim_sample", "ddpm_sample", "dpm_solver_pp", "dpm_solver_pp_sample",
           "dpm_timesteps", "flow_dpm_solver_pp_sample", "flow_dpm_sigmas", "flow_euler_sample", "flow_euler_sigmas",
           "guided_denoiser", "make_objective", "sample", "shift_sigma", "space_timesteps"]
