"""Training objectives a trainer calls as ``loss, parts = objective.loss(model_fn, x0, y, generator)``.

``model_fn(x_t, t, y)``: x_t (B, C, H, W) noised latents, t (B,) float timesteps, y (B,) class ids; it returns
(B, C, H, W), or (B, 2C, H, W) for ``learn_sigma`` (eps, then the variance interpolation v in [-1, 1]).
Label dropout for guidance is the trainer's job (it calls the model's ``drop_labels`` before the loss).

- ``"eps"`` (DDPM, DiT / U-ViT): index i uniform in 0..T-1, ``x_t = sqrt(abar_i) x0 + sqrt(1 - abar_i) noise``,
  t = i + time_offset; loss = mean_b [mean_chw (noise - eps)^2 (+ VB_b with learn_sigma)].
- ``"flow"`` (rectified flow, Sana): ``s = shift_sigma(sigmoid(N(logit_mean, logit_std^2)), shift)``,
  ``x_t = (1 - s) x0 + s noise``, t = 1000 s; loss = mean (v - (noise - x0))^2.
"""
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from .likelihood import discretized_gaussian_log_likelihood, normal_kl
from .rng import randint, randn
from .schedules import BETA_SCHEDULES, FLOW_TIME_SCALE, NUM_TIMESTEPS, DiscreteSchedule, shift_sigma

KINDS = ("eps", "flow")
ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.dim())))


def _time_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _check_batch(x0: torch.Tensor, y: torch.Tensor):
    if x0.dim() < 2 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be (B, C, ...) with B >= 1, got shape {tuple(x0.shape)}")
    if y.shape != (x0.shape[0],):
        raise ValueError(f"y must have shape ({x0.shape[0]},) to match x0, got {tuple(y.shape)}")


def _check_output(out: torch.Tensor, x0: torch.Tensor, learn_sigma: bool):
    channels = x0.shape[1] * (2 if learn_sigma else 1)
    expected = (x0.shape[0], channels, *x0.shape[2:])
    if tuple(out.shape) != expected:
        raise ValueError(f"the model returned shape {tuple(out.shape)}, the objective expects {expected}"
                         + (" (eps and variance values)" if learn_sigma else ""))


def _parts(**values: torch.Tensor) -> dict[str, float]:
    """Batch means of the named (B,) terms as floats, with one device sync."""
    means = torch.stack([v.detach().float().mean() for v in values.values()]).tolist()
    return dict(zip(values, means))


class Objective(ABC):
    """What a trainer and a sampler need of an objective: ``kind``, ``learn_sigma`` (the model outputs 2C
    channels), ``num_timesteps`` (T = 1000: DDPM steps; flow t = 1000 s), ``loss``, and ``config`` (the
    `make_objective` arguments that rebuild it, for checkpoints)."""

    kind: str
    learn_sigma: bool = False
    num_timesteps: int = NUM_TIMESTEPS

    @abstractmethod
    def loss(self, model_fn: ModelFn, x0: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss to backpropagate, {part name: batch-mean float}) for clean latents x0 (B, C, H, W) and
        classes y (B,). Timesteps, then noise, are drawn from ``generator`` (the global RNG if None): the same
        generator state gives the same loss."""

    @property
    @abstractmethod
    def config(self) -> dict:
        """The keyword arguments of `make_objective` that rebuild this objective."""


class EpsObjective(Objective):
    """DDPM epsilon prediction on ``DiscreteSchedule.named(schedule, time_offset=time_offset)``.

    With ``learn_sigma`` the loss adds DiT / ADM's VB term (``LossType.MSE`` with ``LEARNED_RANGE``, not rescaled):
    per sample, in bits per dimension, KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i)) for i > 0 and the decoder NLL
    -log p(x0 | x_1) (discretised Gaussian) for i = 0, where p's mean comes from the DETACHED eps (the VB term
    trains only the variance) and its log variance is the learned range of `DiscreteSchedule.p_log_variance`.
    Parts: ``mse`` and, with learn_sigma, ``vb``.
    """

    kind = "eps"

    def __init__(self, schedule: str = "linear", learn_sigma: bool = False, time_offset: int = 0):
        if isinstance(time_offset, bool) or not isinstance(time_offset, int) or time_offset < 0:
            raise ValueError(f"time_offset must be an int >= 0, got {time_offset!r}")
        self.schedule_name, self.learn_sigma, self.time_offset = schedule, bool(learn_sigma), time_offset
        self.schedule = DiscreteSchedule.named(schedule, NUM_TIMESTEPS, time_offset)

    @property
    def config(self) -> dict:
        return dict(kind=self.kind, learn_sigma=self.learn_sigma, schedule=self.schedule_name,
                    time_offset=self.time_offset)

    def sample_index(self, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """(batch,) int64 step indices, uniform in 0..T-1."""
        return randint(self.schedule.num_timesteps, (batch,), generator, device)

    def vb(self, x0: torch.Tensor, x_t: torch.Tensor, index: torch.Tensor, eps: torch.Tensor,
           var_values: torch.Tensor) -> torch.Tensor:
        """The VB term (B,) in bits per dimension (nats / ln 2, averaged over C, H, W) given the model's eps and
        variance values v (each (B, C, H, W)); pass eps detached to train only the variance, as `loss` does."""
        s = self.schedule
        true_mean, true_log_var = s.q_posterior(x0, x_t, index)
        model_mean, _ = s.q_posterior(s.predict_x0(x_t, index, eps), x_t, index)
        model_log_var = s.p_log_variance(index, x_t, "learned_range", var_values)
        kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
        return torch.where(index == 0, nll, kl)

    def loss(self, model_fn, x0, y, generator=None):
        _check_batch(x0, y)
        index = self.sample_index(x0.shape[0], generator, x0.device)
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        x_t = self.schedule.q_sample(x0, index, noise).to(x0.dtype)
        out = model_fn(x_t, self.schedule.model_time(index, x0), y)
        _check_output(out, x0, self.learn_sigma)
        channels = x0.shape[1]
        eps = out[:, :channels]
        mse = mean_flat((noise - eps) ** 2)
        if not self.learn_sigma:
            return mse.mean(), _parts(mse=mse)
        vb = self.vb(x0, x_t, index, eps.detach(), out[:, channels:])
        return (mse + vb).mean(), _parts(mse=mse, vb=vb)


class FlowObjective(Objective):
    """Rectified flow with velocity target ``noise - x0`` and shifted logit-normal timesteps (Sana: shift 3.0,
    logit mean 0, std 1). Sana draws the same s quantised to 1/1000 (floor(1000 u) / 1000 before the shift); here
    s is continuous. The model sees t = 1000 s. Parts: ``mse``."""

    kind = "flow"

    def __init__(self, shift: float = 3.0, logit_mean: float = 0.0, logit_std: float = 1.0):
        if not shift > 0:
            raise ValueError(f"shift must be > 0, got {shift!r}")
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std!r}")
        self.shift, self.logit_mean, self.logit_std = float(shift), float(logit_mean), float(logit_std)

    @property
    def config(self) -> dict:
        return dict(kind=self.kind, shift=self.shift, logit_mean=self.logit_mean, logit_std=self.logit_std)

    def sample_sigma(self, batch: int, generator: torch.Generator | None, device,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(batch,) noise levels ``shift_sigma(sigmoid(logit_mean + logit_std z), shift)``, z ~ N(0, 1)."""
        z = randn((batch,), generator, device, dtype)
        return shift_sigma(torch.sigmoid(self.logit_mean + self.logit_std * z), self.shift)

    def loss(self, model_fn, x0, y, generator=None):
        _check_batch(x0, y)
        s = self.sample_sigma(x0.shape[0], generator, x0.device, _time_dtype(x0))
        noise = randn(x0.shape, generator, x0.device, x0.dtype)
        s_ = s.view(-1, *([1] * (x0.dim() - 1)))
        x_t = ((1.0 - s_) * x0 + s_ * noise).to(x0.dtype)
        out = model_fn(x_t, FLOW_TIME_SCALE * s, y)
        _check_output(out, x0, False)
        mse = mean_flat((out - (noise - x0)) ** 2)
        return mse.mean(), _parts(mse=mse)


def make_objective(kind: str, learn_sigma: bool = False, schedule: str | None = None, *,
                   time_offset: int | None = None, shift: float | None = None, logit_mean: float | None = None,
                   logit_std: float | None = None) -> Objective:
    """The objective a config names. ``kind="eps"``: ``schedule`` "linear" (DiT, the default) or "scaled_linear"
    (U-ViT), ``learn_sigma`` (DiT's learned-range variance + VB term), ``time_offset`` (default 0; 1 for U-ViT /
    efficientvit checkpoints, which see t in 1..1000). ``kind="flow"``: ``shift`` (default 3.0), ``logit_mean``
    (0.0), ``logit_std`` (1.0). An argument of the other kind is an error, not ignored."""
    if kind == "eps":
        flow_args = {"shift": shift, "logit_mean": logit_mean, "logit_std": logit_std}
        given = sorted(name for name, value in flow_args.items() if value is not None)
        if given:
            raise ValueError(f"{', '.join(given)} apply to the flow objective only, not to kind='eps'")
        schedule = "linear" if schedule is None else schedule
        if schedule not in BETA_SCHEDULES:
            raise ValueError(f"schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")
        return EpsObjective(schedule, learn_sigma, 0 if time_offset is None else time_offset)
    if kind == "flow":
        if learn_sigma:
            raise ValueError("learn_sigma applies to kind='eps' only (a flow model predicts the velocity alone)")
        if schedule is not None or time_offset is not None:
            raise ValueError("schedule and time_offset apply to kind='eps' only; the flow objective's schedule is "
                             "set by shift")
        return FlowObjective(3.0 if shift is None else shift, 0.0 if logit_mean is None else logit_mean,
                             1.0 if logit_std is None else logit_std)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
