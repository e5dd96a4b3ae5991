"""Input checks shared by the ops: each raises a ValueError/TypeError naming the argument.

One rule per kind of argument, the same for every op:
- tensors: a torch.Tensor of a floating dtype (fp16, bf16, fp32, fp64) and the documented rank; tensors that go
  together share a device (and a dtype where the op says so).
- sizes (head_dim, factor, out_channels, channels): a Python int (not a bool) >= 1, and <= the op's maximum
  where its kernels have one.
- eps: a finite real number (int or float, not a bool) >= 0. 0 is allowed: where a normaliser is then exactly 0
  (an all-zero pixel in rms_norm_2d, a query that sees no key in linear attention) the result is inf or NaN,
  in the kernels exactly as in the reference.
"""
import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    """``t`` is a floating tensor of rank ``ndim``; ``layout`` (e.g. "(B, C, H, W)") is quoted in errors."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} (rank {ndim}), got shape {tuple(t.shape)}")


def check_positive_int(name: str, v: int, maximum: int | None = None) -> None:
    """``v`` is an int >= 1 (and <= ``maximum`` when given)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}")


def check_eps(eps: float, name: str = "eps") -> None:
    """``eps`` is a finite real number >= 0: the one rule for every op's eps (see the module docstring)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {eps}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, shape: tuple) -> None:
    """``t`` has exactly ``shape``, and ``ref``'s dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: put both on one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
