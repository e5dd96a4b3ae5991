"""dcae-kernels: Triton kernels for DC-AE as torch ops with autograd, each with a plain-torch reference."""
from . import nn, reference
from .backend import backend
from .linear_attention import (relu_linear_attention, relu_linear_attention_apply, relu_linear_attention_state,
                               relu_linear_attention_tokens, relu_linear_attention_tokens_apply,
                               relu_linear_attention_tokens_state)
from .modulated_norm import modulated_layer_norm
from .norm import rms_norm_2d
from .patch import patch, patch_report, unpatch
from .shortcut import channel_to_space_dup, space_to_channel_avg

__all__ = ["backend", "channel_to_space_dup", "modulated_layer_norm", "nn", "patch", "patch_report", "reference",
           "relu_linear_attention", "relu_linear_attention_apply", "relu_linear_attention_state",
           "relu_linear_attention_tokens", "relu_linear_attention_tokens_apply", "relu_linear_attention_tokens_state",
           "rms_norm_2d", "space_to_channel_avg", "unpatch"]
