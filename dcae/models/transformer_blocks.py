"""The blocks DiT and U-ViT share: timestep and class embeddings, patchify / unpatchify on the space-to-channel
ops, attention (softmax or ReLU linear), the FFNs (MLP, Mix-FFN) and gradient checkpointing per block. Their common
interface is `dcae.models.latent_transformer.LatentTransformer`.

Tokens are (B, N, C). Patchify is space-to-channel: p x p patches become channels (order: channel, row, column
within the patch, as `pixel_unshuffle`), then a linear embedding; unpatchify is the inverse of that layout.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import dcae_kernels

from .transformer_config import TransformerConfig


def timestep_sinusoid(t: torch.Tensor, dim: int, freq_shift: int = 0, max_period: float = 10000.0) -> torch.Tensor:
    """t: (B,) timesteps (floats allowed) -> (B, dim) fp32: ``[cos(t f), sin(t f)]``,
    ``f_i = exp(-ln(max_period) * i / (dim // 2 - freq_shift))`` (DiT, U-ViT: shift 0; diffusers: 1)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    args = t.float()[:, None] * torch.exp(exponent / (half - freq_shift))[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


def sincos_pos_embed_2d(dim: int, height: int, width: int, device=None) -> torch.Tensor:
    """DiT's fixed position embedding of a (height, width) token grid, row-major -> (height * width, dim) fp32.
    Channels [0, dim/2) encode the column, [dim/2, dim) the row, each as ``[sin(pos w), cos(pos w)]`` with
    ``w_i = 10000^(-i / (dim / 4))``; computed in fp64."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    omega = 10000.0 ** -(torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=device),
                                torch.arange(width, dtype=torch.float64, device=device), indexing="ij")

    def encode(pos):
        args = pos.reshape(-1, 1) * omega
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class TimestepEmbedder(nn.Module):
    """t: (B,) -> (B, hidden): 256 sinusoid frequencies -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, freq_shift: int = 0, frequencies: int = 256):
        super().__init__()
        self.frequencies, self.freq_shift = frequencies, freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_sinusoid(t, self.frequencies, self.freq_shift).to(self.mlp[0].weight.dtype))


class ClassEmbedder(nn.Module):
    """y: (B,) class ids in [0, num_classes] -> (B, hidden); row ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> tokens (B, H/p * W/p, hidden): space-to-channel (no averaging), then a linear embedding."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Linear(in_channels * patch_size * patch_size, hidden_size)

    def forward(self, x):
        p = self.patch_size
        if p > 1:  # factor 1 is the identity: skip the copy
            x = dcae_kernels.space_to_channel_avg(x, x.shape[1] * p * p, p)
        return self.proj(x.flatten(2).transpose(1, 2))


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], channels: int, patch_size: int) -> torch.Tensor:
    """tokens (B, gh * gw, channels * p * p), each patch's values ordered (channel, row, column) ->
    (B, channels, gh * p, gw * p): channel-to-space with no duplication."""
    x = tokens.transpose(1, 2).unflatten(2, grid)
    if patch_size > 1:
        x = dcae_kernels.channel_to_space_dup(x, channels, patch_size)
    return x


class Attention(nn.Module):
    """Multi-head self-attention over tokens (B, N, C): one qkv Linear, then softmax attention
    (`scaled_dot_product_attention`) or Sana's ReLU linear attention (`dcae_kernels.relu_linear_attention_tokens`,
    fp32 accumulation), then the output Linear."""

    def __init__(self, hidden_size: int, heads: int, qkv_bias: bool, linear: bool, eps: float = 1e-15):
        super().__init__()
        self.heads, self.linear, self.eps = heads, linear, eps
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # each (B, N, heads, head_dim)
        if self.linear:
            out = dcae_kernels.relu_linear_attention_tokens(q, k, v, self.eps)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)
        return self.proj(out.flatten(2))


class MLP(nn.Module):
    """fc1 -> GELU (``approximate``: "tanh" for DiT, "none" for U-ViT) -> fc2."""

    def __init__(self, hidden_size: int, mlp_hidden: int, approximate: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MixFFN(nn.Module):
    """Sana's Mix-FFN (GLUMBConv) on the token grid: 1x1 conv to 2 x mlp_hidden with bias + SiLU, 3x3 depthwise conv
    with bias, ``a * SiLU(gate)`` of its two halves, 1x1 conv back without bias. Tokens are ``extra_tokens``
    non-grid tokens (U-ViT's time and class) followed by the (gh, gw) grid row-major; the depthwise conv sees each
    extra token as its own zero-padded 1 x 1 image (only the kernel's centre tap applies)."""

    def __init__(self, hidden_size: int, mlp_hidden: int, grid: tuple[int, int], extra_tokens: int = 0):
        super().__init__()
        self.grid, self.extra_tokens = grid, extra_tokens
        self.inverted_conv = nn.Linear(hidden_size, 2 * mlp_hidden)
        self.depth_conv = nn.Conv2d(2 * mlp_hidden, 2 * mlp_hidden, 3, padding=1, groups=2 * mlp_hidden)
        self.point_conv = nn.Linear(mlp_hidden, hidden_size, bias=False)

    def forward(self, x):
        h = F.silu(self.inverted_conv(x))
        extra, tokens = h[:, :self.extra_tokens], h[:, self.extra_tokens:]
        tokens = self.depth_conv(tokens.transpose(1, 2).unflatten(2, self.grid)).flatten(2).transpose(1, 2)
        if self.extra_tokens:
            extra = extra * self.depth_conv.weight[:, 0, 1, 1] + self.depth_conv.bias
            tokens = torch.cat([extra, tokens], dim=1)
        a, gate = tokens.chunk(2, dim=-1)
        return self.point_conv(a * F.silu(gate))


def make_ffn(config: TransformerConfig, approximate: str, extra_tokens: int = 0) -> nn.Module:
    if config.ffn == "glumbconv":
        return MixFFN(config.hidden_size, config.mlp_hidden, config.grid, extra_tokens)
    return MLP(config.hidden_size, config.mlp_hidden, approximate)


def run_block(block: nn.Module, checkpointing: bool, *args):
    """``block(*args)``; with ``checkpointing`` while autograd records, its activations are recomputed in
    backward instead of kept."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
