"""Plain torch + einops versions of every op: the ground truth for tests and the CPU path."""
import torch
from einops import rearrange, reduce, repeat


def space_to_channel_avg(x: torch.Tensor, out_channels: int, factor: int = 2,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: (B, C, H, W) -> (B, out_channels, H/f, W/f).

    y = mean over groups of G = C*f*f/out_channels consecutive channels of pixel_unshuffle(x, f) (+ residual).
    """
    y = rearrange(x, "b c (h i) (w j) -> b (c i j) h w", i=factor, j=factor)
    y = reduce(y, "b (o g) h w -> b o h w", "mean", o=out_channels)
    return y if residual is None else y + residual


def channel_to_space_dup(x: torch.Tensor, out_channels: int, factor: int = 2,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: (B, C, H, W) -> (B, out_channels, H*f, W*f).

    y = pixel_shuffle(x.repeat_interleave(R, dim=1), f) with R = out_channels*f*f/C (+ residual).
    """
    r = out_channels * factor * factor // x.shape[1]
    y = repeat(x, "b c h w -> b (c r) h w", r=r)
    y = rearrange(y, "b (c i j) h w -> b c (h i) (w j)", i=factor, j=factor)
    return y if residual is None else y + residual
