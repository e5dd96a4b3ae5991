"""Thin nn.Module wrappers around the ops."""
import torch
from torch import nn

from .checks import check_positive_int
from .linear_attention import relu_linear_attention
from .norm import rms_norm_2d
from .shortcut import channel_to_space_dup, space_to_channel_avg


class _Shortcut(nn.Module):
    """A DC-AE shortcut op with fixed channel counts and factor; ``forward(x, residual=None)``."""

    def __init__(self, op, in_channels: int, out_channels: int, factor: int):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("factor", factor)):
            check_positive_int(name, value)
        low, high = (out_channels, in_channels) if op is space_to_channel_avg else (in_channels, out_channels)
        if high * factor * factor % low:
            raise ValueError(f"{low} channels (low-res side) must divide {high} channels * factor^2 = "
                             f"{high * factor * factor}")
        self.op, self.in_channels, self.out_channels, self.factor = op, in_channels, out_channels, factor

    def forward(self, x, residual=None):
        if x.dim() == 4 and x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels, got {x.shape[1]}")
        return self.op(x, self.out_channels, self.factor, residual)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, factor={self.factor}"


class SpaceToChannelAvg(_Shortcut):
    """DC-AE downsample shortcut: (B, in_channels, H, W) -> (B, out_channels, H/f, W/f), + residual if given."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2):
        super().__init__(space_to_channel_avg, in_channels, out_channels, factor)


class ChannelToSpaceDup(_Shortcut):
    """DC-AE upsample shortcut: (B, in_channels, H, W) -> (B, out_channels, H*f, W*f), + residual if given."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2):
        super().__init__(channel_to_space_dup, in_channels, out_channels, factor)


class ReLULinearAttention(nn.Module):
    """LiteMLA's ReLU linear attention: qkv (B, heads*3*head_dim, H, W) -> (B, heads*head_dim, H, W).

    qkv in DC-AE's per-head interleaved layout (per head: q, k, v blocks of head_dim channels).
    """

    def __init__(self, head_dim: int = 32, eps: float = 1e-15):
        super().__init__()
        check_positive_int("head_dim", head_dim)
        self.head_dim, self.eps = head_dim, eps

    def forward(self, qkv):
        return relu_linear_attention(qkv, self.head_dim, self.eps)

    def extra_repr(self):
        return f"head_dim={self.head_dim}, eps={self.eps}"


class RMSNorm2d(nn.Module):
    """DC-AE's channel RMSNorm with weight and bias: (B, channels, H, W) -> (B, channels, H, W),
    ``y = x * rsqrt(mean_c(x^2) + eps) * weight + bias`` in fp32, ``+ residual`` fused when given.

    A residual of another dtype than x (e.g. under autocast) is added after the op, with torch's type promotion;
    it must still have x's shape (it is never broadcast).
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        check_positive_int("channels", channels)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x, residual=None):
        if isinstance(residual, torch.Tensor) and isinstance(x, torch.Tensor) and residual.dtype != x.dtype:
            if residual.shape != x.shape:
                raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
            return residual + rms_norm_2d(x, self.weight, self.bias, self.eps)
        return rms_norm_2d(x, self.weight, self.bias, self.eps, residual)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"
