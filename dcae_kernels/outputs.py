"""Output allocation for the op launchers. Tests set ``POISON = True`` so every output starts as NaN
and an element a kernel forgets to write fails the comparison."""
import torch

POISON = False


def new_output(like: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An uninitialised (or, under POISON, NaN-filled) tensor of ``shape`` with ``like``'s dtype and device."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)
    return like.new_empty(shape)
