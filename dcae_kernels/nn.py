"""Thin nn.Module wrappers around the ops."""
from torch import nn

from .shortcut import channel_to_space_dup, space_to_channel_avg


class SpaceToChannelAvg(nn.Module):
    """DC-AE downsample shortcut: (B, in_channels, H, W) -> (B, out_channels, H/f, W/f), + residual if given."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2):
        super().__init__()
        if in_channels * factor * factor % out_channels:
            raise ValueError(f"out_channels={out_channels} must divide in_channels*factor^2 = "
                             f"{in_channels * factor * factor}")
        self.in_channels, self.out_channels, self.factor = in_channels, out_channels, factor

    def forward(self, x, residual=None):
        if x.dim() == 4 and x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels, got {x.shape[1]}")
        return space_to_channel_avg(x, self.out_channels, self.factor, residual)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, factor={self.factor}"


class ChannelToSpaceDup(nn.Module):
    """DC-AE upsample shortcut: (B, in_channels, H, W) -> (B, out_channels, H*f, W*f), + residual if given."""

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2):
        super().__init__()
        if out_channels * factor * factor % in_channels:
            raise ValueError(f"in_channels={in_channels} must divide out_channels*factor^2 = "
                             f"{out_channels * factor * factor}")
        self.in_channels, self.out_channels, self.factor = in_channels, out_channels, factor

    def forward(self, x, residual=None):
        if x.dim() == 4 and x.shape[1] != self.in_channels:
            raise ValueError(f"x must have {self.in_channels} channels, got {x.shape[1]}")
        return channel_to_space_dup(x, self.out_channels, self.factor, residual)

    def extra_repr(self):
        return f"{self.in_channels}, {self.out_channels}, factor={self.factor}"
