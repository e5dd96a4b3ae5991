"""DC-AE building blocks on the dcae_kernels ops. Parameter names follow diffusers' AutoencoderDC,
except LiteMLA's single interleaved ``qkv`` conv (diffusers splits it into ``to_q``/``to_k``/``to_v``).
A block ending in ``x + rms_norm(h)`` runs it as one fused RMSNorm2d + add kernel.

All blocks map (B, C, H, W) -> (B, C', H', W'). Each says how it runs on a tile (`dcae.models.tiling`): a local
block has a ``halo`` (`Halo`); the EfficientViT block's one non-local part, its attention, splits into a state
summed over the whole input (``attention_state``) and ``forward(x, state)``, which is local.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import dcae_kernels
from dcae_kernels.nn import RMSNorm2d


@dataclass(frozen=True)
class Halo:
    """How far a local layer reads, along each axis: output pixels [lo, hi) depend only on the input pixels
    [lo // up * down - radius, ceil(hi / up) * down + radius). Run on that crop of its input (starting on a
    multiple of ``down``, clipped at the borders), the layer gives those output pixels exactly."""

    radius: int
    up: int = 1
    down: int = 1


def conv_halo(conv: nn.Conv2d) -> Halo:
    """A square-kernel conv's halo, from its kernel size, dilation, padding and stride."""
    (k, _), (d, _), (p, _) = conv.kernel_size, conv.dilation, conv.padding
    return Halo(max(p, (k - 1) * d - p), down=conv.stride[0])


class Local(NamedTuple):
    """A local function (B, C, h, w) -> (B, C', h*up/down, w*up/down) and its `Halo`: what tiling runs."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    halo: Halo

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def local(module: nn.Module) -> Local:
    """A local module (a conv, or a block with a ``halo``) as a `Local`."""
    return Local(module, conv_halo(module) if isinstance(module, nn.Conv2d) else module.halo)


def make_norm(kind: str, channels: int) -> nn.Module:
    return RMSNorm2d(channels) if kind == "rms_norm" else nn.BatchNorm2d(channels)


def add_norm(norm: nn.Module, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + norm(h)``: one fused kernel when ``norm`` is an RMSNorm2d (BatchNorm stays torch)."""
    return norm(h, residual) if isinstance(norm, RMSNorm2d) else residual + norm(h)


def add_down_shortcut(x: torch.Tensor, out_channels: int, factor: int, conv_path: torch.Tensor) -> torch.Tensor:
    """``conv_path + space_to_channel_avg(x)`` in one kernel; x takes the conv path's dtype (bf16 under autocast)."""
    return dcae_kernels.space_to_channel_avg(x.to(conv_path.dtype), out_channels, factor, conv_path)


def add_up_shortcut(x: torch.Tensor, out_channels: int, factor: int, conv_path: torch.Tensor) -> torch.Tensor:
    """``conv_path + channel_to_space_dup(x)`` in one kernel; x takes the conv path's dtype (bf16 under autocast)."""
    return dcae_kernels.channel_to_space_dup(x.to(conv_path.dtype), out_channels, factor, conv_path)


def make_act(kind: str) -> nn.Module:
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "silu": nn.SiLU, "gelu": nn.GELU}[kind]()


class ResBlock(nn.Module):
    """``x + norm(conv3x3(act(conv3x3(x, bias)), no bias))``."""

    def __init__(self, channels: int, norm: str, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = make_norm(norm, channels)
        self.act = make_act(act)

    @property
    def halo(self) -> Halo:
        return Halo(conv_halo(self.conv1).radius + conv_halo(self.conv2).radius)

    def forward(self, x):
        return add_norm(self.norm, self.conv2(self.act(self.conv1(x))), x)


class MultiscaleProjection(nn.Module):
    """Multi-scale qkv aggregation: depthwise s x s conv, then grouped 1x1 conv (one group per q/k/v head)."""

    def __init__(self, channels: int, groups: int, kernel_size: int):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels,
                                 bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)

    @property
    def halo(self) -> Halo:
        return conv_halo(self.proj_in)

    def forward(self, qkv):
        return self.proj_out(self.proj_in(qkv))


class LiteMLA(nn.Module):
    """EfficientViT's multi-scale ReLU linear attention branch, with its residual: ``x + norm(proj(attn))``.

    qkv (B, 3C, H, W) is per-head interleaved; each scale adds ``C / head_dim`` heads. The attention's one sum
    over all pixels is its state (`attention_state`); ``forward(x, state)`` with a given state is local, so
    ``forward(x) == forward(x, attention_state(x))`` (up to rounding) and a region of x can run with the whole
    input's state.
    """

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...], norm: str, eps: float = 1e-15):
        super().__init__()
        heads = channels // head_dim
        self.head_dim, self.eps = head_dim, eps
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(3 * channels, 3 * heads, s) for s in scales)
        self.to_out = nn.Conv2d(channels * (1 + len(scales)), channels, 1, bias=False)
        self.norm_out = make_norm(norm, channels)

    def project_qkv(self, x):
        """(B, C, H, W) -> the interleaved q, k, v of every head, multi-scale copies included."""
        qkv = self.qkv(x)
        if len(self.to_qkv_multiscale):
            qkv = torch.cat([qkv, *(m(qkv) for m in self.to_qkv_multiscale)], dim=1)
        return qkv

    @property
    def halo(self) -> Halo:
        """The halo of `project_qkv` and of ``forward(x, state)`` (the multi-scale convs')."""
        return Halo(max((m.halo.radius for m in self.to_qkv_multiscale), default=0))

    def qkv_state(self, qkv):
        """qkv (B, 3C', h, w) from `project_qkv` -> the state of those pixels (B, heads, head_dim+1, head_dim),
        ``[v; 1] relu(k)^T`` summed in fp32 (at least): states of disjoint regions add up to their union's."""
        return dcae_kernels.relu_linear_attention_state(qkv, self.head_dim)

    def attention_state(self, x):
        """x (B, C, H, W) -> the state (B, heads, head_dim+1, head_dim) that ``forward(x)`` attends with."""
        return self.qkv_state(self.project_qkv(x))

    def forward(self, x, state=None):
        """x (B, C, h, w) -> (B, C, h, w). With ``state`` (`attention_state` of the whole input, of which x may
        be a region) the queries of x attend to it; without, x attends to itself (one fused op)."""
        qkv = self.project_qkv(x)
        if state is None:
            out = dcae_kernels.relu_linear_attention(qkv, self.head_dim, self.eps)
        else:
            out = dcae_kernels.relu_linear_attention_apply(qkv, state, self.head_dim, self.eps)
        return add_norm(self.norm_out, self.to_out(out), x)


class GLUMBConv(nn.Module):
    """Gated MBConv: ``x + norm(point(a * silu(g)))``, ``a, g = dw3x3(silu(inverted(x)))`` split on channels."""

    def __init__(self, channels: int, expand: int = 4):
        super().__init__()
        hidden = channels * expand
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = RMSNorm2d(channels)

    @property
    def halo(self) -> Halo:
        return conv_halo(self.conv_depth)

    def forward(self, x):
        a, g = self.conv_depth(F.silu(self.conv_inverted(x))).chunk(2, dim=1)
        return self.norm(self.conv_point(a * F.silu(g)), x)


class EfficientViTBlock(nn.Module):
    """LiteMLA (global context) then GLUMBConv (local), each residual. ``forward(x, state)`` with the state of
    the whole input (`attention_state`) is local, with ``halo``; ``forward(x) == forward(x, attention_state(x))``."""

    def __init__(self, channels: int, head_dim: int, scales: tuple[int, ...], norm: str):
        super().__init__()
        self.attn = LiteMLA(channels, head_dim, scales, norm)
        self.conv_out = GLUMBConv(channels)

    @property
    def halo(self) -> Halo:
        """The halo of ``forward(x, state)``."""
        return Halo(self.attn.halo.radius + self.conv_out.halo.radius)

    def attention_state(self, x):
        """x (B, C, H, W) -> its attention's state (B, heads, head_dim+1, head_dim); see `LiteMLA`."""
        return self.attn.attention_state(x)

    def forward(self, x, state=None):
        return self.conv_out(self.attn(x, state))


def make_block(kind: str, channels: int, norm: str, act: str, head_dim: int, scales: tuple[int, ...]):
    if kind == "ResBlock":
        return ResBlock(channels, norm, act)
    return EfficientViTBlock(channels, head_dim, scales, norm)


class DownBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H/2, W/2): conv path (3x3 conv + pixel_unshuffle, or stride-2 conv)
    plus, with ``shortcut``, the space-to-channel averaging shortcut fused with the add."""

    def __init__(self, in_channels: int, out_channels: int, kind: str, shortcut: bool):
        super().__init__()
        self.out_channels, self.unshuffle, self.shortcut = out_channels, kind == "pixel_unshuffle", shortcut
        if self.unshuffle:
            self.conv = nn.Conv2d(in_channels, out_channels // 4, 3, padding=1)
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    @property
    def halo(self) -> Halo:
        return Halo(conv_halo(self.conv).radius, down=2)

    def forward(self, x):
        h = self.conv(x)
        if self.unshuffle:
            h = F.pixel_unshuffle(h, 2)
        return add_down_shortcut(x, self.out_channels, 2, h) if self.shortcut else h


class UpBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, 2H, 2W): conv path (3x3 conv + pixel_shuffle, or nearest x2 + 3x3 conv)
    plus, with ``shortcut``, the channel-to-space duplicating shortcut fused with the add."""

    def __init__(self, in_channels: int, out_channels: int, kind: str, shortcut: bool):
        super().__init__()
        self.out_channels, self.interpolate, self.shortcut = out_channels, kind == "interpolate", shortcut
        self.conv = nn.Conv2d(in_channels, out_channels * (1 if self.interpolate else 4), 3, padding=1)

    @property
    def halo(self) -> Halo:
        return Halo(conv_halo(self.conv).radius, up=2)

    def forward(self, x):
        if self.interpolate:
            h = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        else:
            h = F.pixel_shuffle(self.conv(x), 2)
        return add_up_shortcut(x, self.out_channels, 2, h) if self.shortcut else h
