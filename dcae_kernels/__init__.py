"""dcae-kernels: Triton kernels for DC-AE as torch ops with autograd, each with a plain-torch reference."""
from . import nn, reference
from .backend import backend
from .linear_attention import relu_linear_attention, relu_linear_attention_tokens
from .norm import rms_norm_2d
from .shortcut import channel_to_space_dup, space_to_channel_avg

__all__ = ["backend", "channel_to_space_dup", "nn", "reference", "relu_linear_attention",
           "relu_linear_attention_tokens", "rms_norm_2d", "space_to_channel_avg"]
