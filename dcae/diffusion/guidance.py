"""Classifier-free guidance: a model and class ids -> ``denoise(x, t)`` for the samplers.

``model``: a function ``model(x, t, y)`` or an object with ``forward(x, t, y)`` (an nn.Module is both) and, for
guidance, ``forward_with_cfg(x, t, y, scale)`` = ``uncond + scale (cond - uncond)`` over all output channels, with
the unconditional branch on the null class ``num_classes``. Scale 1 calls ``forward`` alone (half the cost).

With ``learn_sigma`` the output is (B, 2C, ...): guidance applies to the eps half only and the variance half is the
conditional branch's, as DiT does (guiding the variance values would move them out of [-1, 1]). Since
``forward_with_cfg`` guides every channel, that case batches [cond; uncond] through ``forward`` itself with
y_null = ``model.num_classes`` (or ``model.config.num_classes``).
"""
from collections.abc import Callable

import torch

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def null_class(model) -> int:
    """The null class id of a model: ``model.num_classes``, else ``model.config.num_classes``."""
    value = getattr(model, "num_classes", None)
    if value is None:
        value = getattr(getattr(model, "config", None), "num_classes", None)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("guiding a learn_sigma model needs the null class id as model.num_classes or "
                         "model.config.num_classes")
    return value


def check_model(model, cfg_scale: float, learn_sigma: bool):
    """Raise a ValueError now, before sampling, if ``model`` cannot be called as guidance at ``cfg_scale`` needs."""
    if not callable(model) and not callable(getattr(model, "forward", None)):
        raise ValueError("model must be a function model(x, t, y) or have a forward(x, t, y) method")
    if cfg_scale == 1.0:
        return
    if learn_sigma:
        null_class(model)
    elif not callable(getattr(model, "forward_with_cfg", None)):
        raise ValueError(f"cfg_scale {cfg_scale} != 1 needs a model with forward_with_cfg(x, t, y, scale)")


def guided_denoiser(model, y: torch.Tensor, cfg_scale: float, learn_sigma: bool) -> Denoise:
    """``denoise(x, t)``: the model's output for classes y (B,) at x (B, C, H, W), t (B,), guided with
    ``cfg_scale``; (B, C, H, W), or (B, 2C, H, W) with ``learn_sigma``."""
    check_model(model, cfg_scale, learn_sigma)
    forward = model if callable(model) else model.forward
    if cfg_scale == 1.0:
        return lambda x, t: forward(x, t, y)
    if not learn_sigma:
        return lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale)
    y_both = torch.cat([y, torch.full_like(y, null_class(model))])

    def denoise(x, t):
        cond, uncond = forward(torch.cat([x, x]), torch.cat([t, t]), y_both).chunk(2)
        channels = x.shape[1]
        eps = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([eps, cond[:, channels:]], dim=1)

    return denoise
