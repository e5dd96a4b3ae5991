"""The hand-written CUDA C++ shortcut kernels (csrc/shortcut.cu), built on first use, with autograd."""
import functools
import os
from pathlib import Path

import torch


@functools.cache
def extension():
    """Build (or load the cached build of) csrc/shortcut.cu for this GPU."""
    from torch.utils.cpp_extension import load
    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    return load(name="dcae_shortcut_cuda", sources=[str(Path(__file__).parent / "csrc" / "shortcut.cu")],
                extra_cuda_cflags=["-O3"], verbose=False)


class _Down(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_channels, factor, residual):
        ctx.shape, ctx.has_residual = (x.shape[1], out_channels, factor), residual is not None
        return extension().down(x, out_channels, factor, residual, 1.0)

    @staticmethod
    def backward(ctx, grad):
        channels, out_channels, factor = ctx.shape
        group = channels * factor * factor // out_channels
        grad_x = extension().up(grad.contiguous(), channels, factor, None, 1.0 / group)
        return grad_x, None, None, grad if ctx.has_residual else None


class _Up(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_channels, factor, residual):
        ctx.shape, ctx.has_residual = (x.shape[1], out_channels, factor), residual is not None
        return extension().up(x, out_channels, factor, residual, 1.0)

    @staticmethod
    def backward(ctx, grad):
        channels, out_channels, factor = ctx.shape
        repeats = out_channels * factor * factor // channels
        grad_x = extension().down(grad.contiguous(), channels, factor, None, float(repeats))
        return grad_x, None, None, grad if ctx.has_residual else None


def space_to_channel_avg(x, out_channels, factor=2, residual=None):
    """CUDA C++ version of dcae_kernels.space_to_channel_avg (contiguous CUDA tensors)."""
    return _Down.apply(x, out_channels, factor, residual)


def channel_to_space_dup(x, out_channels, factor=2, residual=None):
    """CUDA C++ version of dcae_kernels.channel_to_space_dup (contiguous CUDA tensors)."""
    return _Up.apply(x, out_channels, factor, residual)
