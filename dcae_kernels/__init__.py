"""dcae-kernels: Triton kernels for DC-AE as torch ops with autograd, each with a plain-torch reference."""
from . import nn, reference
from .backend import backend
from .shortcut import channel_to_space_dup, space_to_channel_avg

__all__ = ["backend", "channel_to_space_dup", "nn", "reference", "space_to_channel_avg"]
