"""Exact tiled encode/decode for DC-AE: the tiled output equals the untiled one up to float rounding.

Every layer of a DC-AE is local (convolutions, pixel (un)shuffle, the shortcuts, per-pixel RMSNorm,
eval-mode BatchNorm) except one reduction per EfficientViT block: linear attention's per-head sums
``vk = [v; 1] relu(k)^T`` over all pixels. So the network runs as local chains separated by those sums:

- a local chain runs tile by tile. An output tile reads the input region its receptive field covers (its
  halo, derived from the layers' kernel sizes), and every intermediate is cropped to what the remaining
  layers still read. Crops that enter a stride-2 layer start on even pixels, so pixel_unshuffle and stride-2
  convs see the pixel grid of the untiled run; zero padding then only acts at true image borders.
- before an EfficientViT block the chain so far is stitched into a whole tensor at that (low) resolution;
  one pass over its tiles sums ``vk`` (fp32); the rest of the block, attention applied with that ``vk`` then
  GLUMBConv, is local and opens the next chain. This split form of the attention runs the plain-torch
  `dcae_kernels.reference` functions (it happens at 1/8 resolution and below, where it is cheap).

Tiles cover the same image region at every resolution: ``tile_size / f`` pixels at 1/f of the image side.
Without autograd (``torch.no_grad`` / ``inference_mode``), peak memory = weights + the per-tile working set
(proportional to ``tile_size**2``) + at most two whole tensors at attention-stage resolutions (1/8 of the image
side and below for the "in"/"mix" layouts; f32c32 at 4096 px, bf16: 512 x 512 x 512 = 268 MB each) + the
output. Counted on meta tensors with the reference ops, f32c32 decode at 4096 px in bf16 keeps 0.65 GB
(tile 512) / 1.33 GB (tile 1024) of activations live, against 15.0 GB untiled; the halos cost 1.41x / 1.17x
the untiled FLOPs (diffusers' tiles of 512 with stride 448 cost 1.30x). With autograd every tile's
activations are kept for backward, as untiled.
"""
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from dcae_kernels.reference import relu_linear_attention_apply, relu_linear_attention_state

from .models.blocks import DownBlock, EfficientViTBlock, ResBlock, UpBlock


@dataclass(frozen=True)
class _Step:
    """A local layer (B, C, h, w) -> (B, C', h*up/down, w*up/down). Output pixel ``i`` reads input pixels
    within ``radius`` of ``i*down/up``."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    radius: int
    up: int = 1
    down: int = 1


def _conv_radius(conv: nn.Conv2d) -> int:
    """How many input pixels either side of ``i * stride`` output pixel ``i`` reads (square kernels)."""
    (k, _), (d, _), (p, _) = conv.kernel_size, conv.dilation, conv.padding
    return max(p, (k - 1) * d - p)


def _local_step(module: nn.Module) -> _Step:
    if isinstance(module, nn.Conv2d):
        return _Step(module, _conv_radius(module), down=module.stride[0])
    if isinstance(module, ResBlock):
        return _Step(module, _conv_radius(module.conv1) + _conv_radius(module.conv2))
    if isinstance(module, DownBlock):
        return _Step(module, _conv_radius(module.conv), down=2)
    if isinstance(module, UpBlock):
        return _Step(module, _conv_radius(module.conv), up=2)
    raise TypeError(f"tiling does not know the receptive field of {type(module).__name__}")


def _layer(module: nn.Module):
    return module if isinstance(module, EfficientViTBlock) else _local_step(module)


def _encoder_layers(model) -> list:
    enc = model.encoder
    blocks = [_layer(b) for stage in enc.down_blocks for b in stage]
    return [_local_step(enc.conv_in), *blocks, _Step(enc.project_out, _conv_radius(enc.conv_out))]


def _decoder_layers(model) -> list:
    dec = model.decoder
    blocks = [_layer(b) for stage in reversed(dec.up_blocks) for b in stage]
    out = dataclasses.replace(_local_step(dec.conv_out), fn=dec.project_out)
    return [_Step(dec.project_in, _conv_radius(dec.conv_in)), *blocks, out]


def _sizes(steps: list[_Step], n: int) -> list[int]:
    sizes = [n]
    for s in steps:
        sizes.append(sizes[-1] * s.up // s.down)
    return sizes


def _source(step: _Step, lo: int, hi: int, size: int) -> tuple[int, int]:
    """The input rows [lo', hi') within [0, size) that output rows [lo, hi) of ``step`` read."""
    u, d, r = step.up, step.down, step.radius
    lo, hi = lo // u * d - r, -(-hi // u) * d + r
    lo, hi = lo // d * d, -(-hi // d) * d  # a crop entering a stride-d layer starts on its grid
    return max(lo, 0), min(hi, size)


def _windows(steps: list[_Step], lo: int, hi: int, sizes: list[int]) -> list[tuple[int, int]]:
    """Rows [lo, hi) of the chain's output -> the rows each level provides, input level first."""
    windows = [(lo, hi)]
    for step, size in zip(reversed(steps), reversed(sizes[:-1])):
        windows.append(_source(step, *windows[-1], size))
    return windows[::-1]


def _crop(step: _Step, window_in: tuple[int, int], window_out: tuple[int, int]) -> slice:
    """Where ``window_out`` lies in the output of ``step`` run on ``window_in``."""
    start = window_in[0] * step.up // step.down
    return slice(window_out[0] - start, window_out[1] - start)


def _tiles(steps: list[_Step], x: torch.Tensor, tile: int):
    """Run the local chain ``steps`` on x (B, C, H, W) one output tile (tile x tile, smaller at the far
    edges) at a time; yields (rows, cols, output tile (B, C', len(rows), len(cols)))."""
    hs, ws = _sizes(steps, x.shape[-2]), _sizes(steps, x.shape[-1])
    for top in range(0, hs[-1], tile):
        rows = _windows(steps, top, min(top + tile, hs[-1]), hs)
        for left in range(0, ws[-1], tile):
            cols = _windows(steps, left, min(left + tile, ws[-1]), ws)
            h = x[..., slice(*rows[0]), slice(*cols[0])]
            for step, r_in, r_out, c_in, c_out in zip(steps, rows, rows[1:], cols, cols[1:]):
                h = step.fn(h)[..., _crop(step, r_in, r_out), _crop(step, c_in, c_out)]
            yield slice(*rows[-1]), slice(*cols[-1]), h


def _stitch(steps: list[_Step], x: torch.Tensor, tile: int) -> torch.Tensor:
    """The chain's whole output, computed tile by tile."""
    if not steps:
        return x
    out = None
    for rows, cols, h in _tiles(steps, x, tile):
        if out is None:
            size = (_sizes(steps, x.shape[-2])[-1], _sizes(steps, x.shape[-1])[-1])
            out = h.new_empty(*h.shape[:2], *size)
        out[..., rows, cols] = h
    return out


def _multiscale_radius(attn: nn.Module) -> int:
    return max((_conv_radius(m.proj_in) for m in attn.to_qkv_multiscale), default=0)


def _attention_sums(attn: nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    """x (B, C, H, W) -> vk (B, heads, D+1, D) = sum over all pixels of [v; 1] relu(k)^T."""
    tiles = _tiles([_Step(attn.project_qkv, _multiscale_radius(attn))], x, tile)
    return sum(relu_linear_attention_state(qkv, attn.head_dim) for _, _, qkv in tiles)


def _apply_block(block: EfficientViTBlock, vk: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The EfficientViT block on a region x (B, C, h, w), its attention reading the whole-image sums vk."""
    attn = block.attn
    out = relu_linear_attention_apply(attn.project_qkv(x), vk, attn.head_dim, attn.eps)
    return block.conv_out(attn.add_output(x, out))


def _run(layers: list, x: torch.Tensor, tile_size: int, scale: int) -> torch.Tensor:
    """Run ``layers`` on x, whose pixels are ``scale`` image pixels wide, in tiles of ``tile_size`` image
    pixels: local chains tile by tile, stitched whole before each attention block."""
    chain = []
    for layer in layers:
        if isinstance(layer, EfficientViTBlock):
            x, chain = _stitch(chain, x, tile_size // scale), []
            vk = _attention_sums(layer.attn, x, tile_size // scale)
            radius = _multiscale_radius(layer.attn) + _conv_radius(layer.conv_out.conv_depth)
            layer = _Step(partial(_apply_block, layer, vk), radius)
        chain.append(layer)
        scale = scale * layer.down // layer.up
    return _stitch(chain, x, tile_size // scale)


def _validate(model, tile_size, tile_overlap):
    r = model.spatial_compression_ratio
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size <= 0 or tile_size % r:
        raise ValueError(f"tile_size must be a positive multiple of the compression ratio {r} (image pixels), "
                         f"got {tile_size!r}")
    if tile_overlap is not None:
        raise ValueError("tile_overlap must be None: tiles read the exact halo their receptive field needs "
                         "(derived from the architecture), so the tiled output equals the untiled one")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError("tiling needs BatchNorm in eval mode (batch statistics are global): call model.eval()")


def tiled_encode(model, x: torch.Tensor, tile_size: int, tile_overlap: int | None = None) -> torch.Tensor:
    """x (B, 3, H, W) -> latents (B, c, H/r, W/r), equal to ``model.encoder(x)`` up to float rounding.

    ``tile_size``: tile side in image pixels, a multiple of r; the last row/column of tiles may be smaller.
    ``tile_overlap`` must be None (the halo is exact). H, W are multiples of r (checked by ``DCAE.encode``).
    """
    _validate(model, tile_size, tile_overlap)
    if max(x.shape[-2:]) <= tile_size:
        return model.encoder(x)
    return _run(_encoder_layers(model), x, tile_size, 1)


def tiled_decode(model, z: torch.Tensor, tile_size: int, tile_overlap: int | None = None) -> torch.Tensor:
    """z (B, c, h, w) -> images (B, 3, h*r, w*r), equal to ``model.decoder(z)`` up to float rounding.

    ``tile_size``: tile side in image pixels, a multiple of r; the last row/column of tiles may be smaller.
    ``tile_overlap`` must be None (the halo is exact).
    """
    _validate(model, tile_size, tile_overlap)
    r = model.spatial_compression_ratio
    if max(z.shape[-2:]) * r <= tile_size:
        return model.decoder(z)
    return _run(_decoder_layers(model), z, tile_size, r)
