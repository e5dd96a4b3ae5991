"""Output allocation for the op launchers. Tests set ``POISON = True`` so every output starts as NaN
and an element a kernel forgets to write fails the comparison."""
import torch

POISON = False


def new_output(like: torch.Tensor, shape: tuple, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised (under POISON, NaN-filled) tensor of ``shape`` on ``like``'s device, in ``dtype``
    (default: ``like``'s)."""
    dtype = dtype or like.dtype
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return like.new_empty(shape, dtype=dtype)


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the ops accumulate in for input ``x``: float64 for float64, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
