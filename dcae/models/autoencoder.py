"""The DC-AE encoder, decoder and the `DCAE` model (weight-compatible with diffusers' AutoencoderDC)."""
from typing import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import pretrained
from .blocks import (DownBlock, EfficientViTBlock, Local, RMSNorm2d, UpBlock, add_down_shortcut, add_up_shortcut,
                     conv_halo, local, make_act, make_block)
from .config import DCAEConfig, get_config
from .tiling import check_tiling, tiled


def run_stage(stage: nn.Module, h: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``stage(h)``; with ``checkpointing`` while autograd records, keep only the stage's input and recompute
    its activations in backward. Stages with BatchNorm in training mode always run plainly: recomputing
    would update their running statistics twice."""
    if checkpointing and torch.is_grad_enabled() and not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in stage.modules()):
        return checkpoint(stage, h, use_reentrant=False)
    return stage(h)


class Encoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> latents (B, latent_channels, H/r, W/r)."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        widths, depths = cfg.encoder_widths, cfg.encoder_depths
        self.latent_channels, self.out_shortcut = cfg.latent_channels, cfg.encoder_out_shortcut
        self.gradient_checkpointing = False
        if depths[0] > 0:
            self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        else:
            self.conv_in = DownBlock(cfg.in_channels, widths[1], cfg.downsample_block_type, shortcut=False)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = [make_block(cfg.encoder_block_types[i], width, cfg.encoder_norms[i], cfg.encoder_acts[i],
                                 cfg.attention_head_dim, cfg.encoder_qkv_multiscales[i]) for _ in range(depth)]
            if i < len(widths) - 1 and depth > 0:
                blocks.append(DownBlock(width, widths[i + 1], cfg.downsample_block_type, shortcut=True))
            stages.append(nn.Sequential(*blocks))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(widths[-1], cfg.latent_channels, 3, padding=1)

    def project_out(self, h):
        """Last stage's features (B, C, h, w) -> latents, with the factor-1 channel-averaging shortcut."""
        out = self.conv_out(h)
        return add_down_shortcut(h, self.latent_channels, 1, out) if self.out_shortcut else out

    def layers(self) -> list:
        """``forward`` as the sequence tiling runs: `Local` layers and EfficientViT blocks, in order."""
        blocks = [b if isinstance(b, EfficientViTBlock) else local(b) for stage in self.down_blocks for b in stage]
        return [local(self.conv_in), *blocks, Local(self.project_out, conv_halo(self.conv_out))]

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down_blocks:
            h = run_stage(stage, h, self.gradient_checkpointing)
        return self.project_out(h)


class Decoder(nn.Module):
    """Latents (B, latent_channels, h, w) -> images (B, 3, h*r, w*r). ``up_blocks[i]`` runs at encoder stage
    i's resolution; they run from the last (lowest resolution) to the first."""

    def __init__(self, cfg: DCAEConfig):
        super().__init__()
        widths, depths = cfg.decoder_widths, cfg.decoder_depths
        self.width, self.in_shortcut = widths[-1], cfg.decoder_in_shortcut
        self.gradient_checkpointing = False
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[-1], 3, padding=1)
        stages = []
        for i, (width, depth) in enumerate(zip(widths, depths)):
            blocks = []
            if i < len(widths) - 1 and depth > 0:
                blocks.append(UpBlock(widths[i + 1], width, cfg.upsample_block_type, shortcut=True))
            blocks += [make_block(cfg.decoder_block_types[i], width, cfg.decoder_norms[i], cfg.decoder_acts[i],
                                  cfg.attention_head_dim, cfg.decoder_qkv_multiscales[i]) for _ in range(depth)]
            stages.append(nn.Sequential(*blocks))
        self.up_blocks = nn.ModuleList(stages)
        head = widths[0] if depths[0] > 0 else widths[1]
        self.norm_out = RMSNorm2d(head)
        self.conv_act = make_act(cfg.decoder_out_act)
        if depths[0] > 0:
            self.conv_out = nn.Conv2d(head, cfg.in_channels, 3, padding=1)
        else:
            self.conv_out = UpBlock(head, cfg.in_channels, cfg.upsample_block_type, shortcut=False)

    def project_in(self, z):
        """Latents -> the lowest-resolution features, with the factor-1 channel-duplicating shortcut."""
        h = self.conv_in(z)
        return add_up_shortcut(z, self.width, 1, h) if self.in_shortcut else h

    def project_out(self, h):
        """First stage's features -> images."""
        return self.conv_out(self.conv_act(self.norm_out(h)))

    @property
    def last_conv(self) -> nn.Conv2d:
        """The conv that produces the images."""
        return self.conv_out if isinstance(self.conv_out, nn.Conv2d) else self.conv_out.conv

    def layers(self) -> list:
        """``forward`` as the sequence tiling runs: `Local` layers and EfficientViT blocks, in order."""
        blocks = [b if isinstance(b, EfficientViTBlock) else local(b)
                  for stage in reversed(self.up_blocks) for b in stage]
        return [Local(self.project_in, conv_halo(self.conv_in)), *blocks,
                Local(self.project_out, local(self.conv_out).halo)]  # norm_out and the activation are per pixel

    def forward(self, z):
        h = self.project_in(z)
        for stage in reversed(self.up_blocks):
            h = run_stage(stage, h, self.gradient_checkpointing)
        return self.project_out(h)


class DCAE(nn.Module):
    """Deep Compression Autoencoder: ``encode`` (B, 3, H, W) in [-1, 1] -> unscaled latents
    (B, c, H/r, W/r); ``decode`` back; ``forward`` = reconstruction. Multiply latents by ``scaling_factor``
    before a diffusion model sees them.

    Its parts, the groups a training phase selects by name (`parts`), in the order forward runs them:
    ``encoder.in`` (conv_in), ``encoder.stages.0`` .. ``encoder.stages.{n-1}`` (down_blocks, highest resolution
    first), ``encoder.out`` (conv_out, the latent projection), ``decoder.in`` (conv_in, the latent input
    projection), ``decoder.stages.{n-1}`` .. ``decoder.stages.0`` (up_blocks; decoder stage i works at encoder
    stage i's resolution), ``decoder.out`` (norm_out, the activation, conv_out). Every parameter is in exactly
    one part; stages without blocks are parts without parameters. `deepest_stage` and `last_decoder_stage` name
    the stage indices the paper's phases train; `last_layer_weight` is the layer a GAN loss balances against.
    Parameter (state-dict) names are diffusers' and do not depend on the parts.
    """

    def __init__(self, config: DCAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @classmethod
    def from_config(cls, name_or_config) -> "DCAE":
        """A randomly initialised model of a preset name, a `DCAEConfig` or a dict of its fields."""
        return cls(get_config(name_or_config))

    @classmethod
    def from_pretrained(cls, path, preset=None, dtype: torch.dtype | None = None) -> "DCAE":
        """Load a local diffusers AutoencoderDC folder, one of ours, or the authors' checkpoint (see
        `dcae.models.pretrained.load`)."""
        return pretrained.load(cls, path, preset=preset, dtype=dtype)

    def save_pretrained(self, path, format: str = "dcae") -> None:
        """Write the model to the folder ``path``: ``format="dcae"``: ``config.json`` + ``model.safetensors``;
        ``format="diffusers"``: a folder diffusers' ``AutoencoderDC.from_pretrained`` loads."""
        pretrained.save(self, path, format=format)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each stage's activations in backward instead of keeping them (training memory)."""
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = enabled

    @property
    def spatial_compression_ratio(self) -> int:
        return self.config.spatial_compression_ratio

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def parts(self, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
        """Part name -> module (see the class docstring), all of them in forward order, or those in ``names``
        in that order. ``decoder.out`` is a container of three of the decoder's modules, made on each call."""
        enc, dec = self.encoder, self.decoder
        stages = range(len(enc.down_blocks))
        parts = {"encoder.in": enc.conv_in, **{f"encoder.stages.{i}": enc.down_blocks[i] for i in stages},
                 "encoder.out": enc.conv_out, "decoder.in": dec.conv_in,
                 **{f"decoder.stages.{i}": dec.up_blocks[i] for i in reversed(stages)},
                 "decoder.out": nn.ModuleDict({"norm_out": dec.norm_out, "conv_act": dec.conv_act,
                                               "conv_out": dec.conv_out})}
        if names is None:
            return parts
        if isinstance(names, str):
            raise TypeError(f"names must be an iterable of part names, got the string {names!r}")
        unknown = [n for n in names if n not in parts]
        if unknown:
            raise ValueError(f"unknown DC-AE parts {unknown}; parts: {list(parts)}")
        return {n: parts[n] for n in names}

    @property
    def deepest_stage(self) -> int:
        """The index of the lowest-resolution stage (encoder and decoder): the one nearest the latents."""
        return self.config.num_stages - 1

    @property
    def last_decoder_stage(self) -> int:
        """The index of the decoder stage that runs last among those with parameters (the decoder runs its
        stages from the deepest to 0, and stage 0 is empty in the "in"/"mix" layouts)."""
        return min(i for i, stage in enumerate(self.decoder.up_blocks) if any(True for _ in stage.parameters()))

    @property
    def last_layer_weight(self) -> nn.Parameter:
        """The weight of the decoder's last conv (the one producing the images): the layer a GAN loss's
        adaptive weight balances against."""
        return self.decoder.last_conv.weight

    def _check(self, x: torch.Tensor, channels: int, name: str, multiple: int):
        if not torch.is_tensor(x) or x.dim() != 4:
            raise ValueError(f"{name} must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.shape[1] != channels:
            raise ValueError(f"{name} must have {channels} channels, got {x.shape[1]}")
        if x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"{name}'s height and width {tuple(x.shape[2:])} must be multiples of {multiple} "
                             "(pad the image to a multiple of the compression ratio)")

    def encode(self, x: torch.Tensor, tile_size: int | None = None, tile_overlap: int | None = None):
        """(B, 3, H, W) in [-1, 1] -> (B, c, H/r, W/r); B = 0 gives an empty batch of latents.

        ``tile_size``: run in tiles of that side (image pixels, a multiple of r; `dcae.models.tiling`), with
        the same result up to float rounding. ``tile_overlap`` must be None (the tiles' halos are exact).
        """
        r = self.spatial_compression_ratio
        self._check(x, self.config.in_channels, "x", r)
        check_tiling(self, r, tile_size, tile_overlap)
        if not len(x):
            return x.new_empty(0, self.config.latent_channels, x.shape[2] // r, x.shape[3] // r)
        if tile_size is None or max(x.shape[2:]) <= tile_size:
            return self.encoder(x)
        return tiled(self.encoder.layers(), x, tile_size, scale=1)

    def decode(self, z: torch.Tensor, tile_size: int | None = None, tile_overlap: int | None = None):
        """(B, c, h, w) -> (B, 3, h*r, w*r); B = 0 gives an empty batch of images. ``tile_size`` /
        ``tile_overlap``: as in `encode`."""
        r = self.spatial_compression_ratio
        self._check(z, self.config.latent_channels, "z", 1)
        check_tiling(self, r, tile_size, tile_overlap)
        if not len(z):
            return z.new_empty(0, self.config.in_channels, z.shape[2] * r, z.shape[3] * r)
        if tile_size is None or max(z.shape[2:]) * r <= tile_size:
            return self.decoder(z)
        return tiled(self.decoder.layers(), z, tile_size, scale=r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
