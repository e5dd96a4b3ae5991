"""Exact tiled encode/decode for DC-AE: the tiled output equals the untiled one up to float rounding.

Tiling composes blocks through what each block says about itself (`dcae.models.blocks`): a local block has a
`Halo` (how far it reads); an EfficientViT block has one sum over all pixels, its attention state, and is local
once that state is given. So the network runs as local chains separated by those sums:

- a local chain runs tile by tile. An output tile reads the input region its halos cover, and every
  intermediate is cropped to what the remaining layers still read. Crops that enter a stride-2 layer start on
  even pixels, so pixel_unshuffle and stride-2 convs see the pixel grid of the untiled run; zero padding then
  only acts at true image borders.
- before an EfficientViT block the chain so far is stitched into a whole tensor at that (low) resolution;
  one pass over its tiles sums the attention state (fp32, the ``dcae_kernels`` state op); the block run with
  that state, ``block(x, state)``, is local and opens the next chain.

Tiles cover the same image region at every resolution: ``tile_size / f`` pixels at 1/f of the image side.
Without autograd (``torch.no_grad`` / ``inference_mode``), peak memory = weights + the per-tile working set
(proportional to ``tile_size**2``) + at most two whole tensors at attention-stage resolutions (1/8 of the image
side and below for the "in"/"mix" layouts; f32c32 at 4096 px, bf16: 512 x 512 x 512 = 268 MB each) + the
output. Counted on meta tensors with the reference ops, f32c32 decode at 4096 px in bf16 keeps 0.65 GB
(tile 512) / 1.33 GB (tile 1024) of activations live, against 15.0 GB untiled; the halos cost 1.41x / 1.17x
the untiled FLOPs (diffusers' tiles of 512 with stride 448 cost 1.30x). With autograd every tile's
activations are kept for backward, as untiled.
"""
from functools import partial

import torch
from torch import nn

from .blocks import EfficientViTBlock, Local


def _sizes(steps: list[Local], n: int) -> list[int]:
    sizes = [n]
    for s in steps:
        sizes.append(sizes[-1] * s.halo.up // s.halo.down)
    return sizes


def _source(step: Local, lo: int, hi: int, size: int) -> tuple[int, int]:
    """The input rows [lo', hi') within [0, size) that output rows [lo, hi) of ``step`` read."""
    u, d, r = step.halo.up, step.halo.down, step.halo.radius
    lo, hi = lo // u * d - r, -(-hi // u) * d + r
    lo, hi = lo // d * d, -(-hi // d) * d  # a crop entering a stride-d layer starts on its grid
    return max(lo, 0), min(hi, size)


def _windows(steps: list[Local], lo: int, hi: int, sizes: list[int]) -> list[tuple[int, int]]:
    """Rows [lo, hi) of the chain's output -> the rows each level provides, input level first."""
    windows = [(lo, hi)]
    for step, size in zip(reversed(steps), reversed(sizes[:-1])):
        windows.append(_source(step, *windows[-1], size))
    return windows[::-1]


def _crop(step: Local, window_in: tuple[int, int], window_out: tuple[int, int]) -> slice:
    """Where ``window_out`` lies in the output of ``step`` run on ``window_in``."""
    start = window_in[0] * step.halo.up // step.halo.down
    return slice(window_out[0] - start, window_out[1] - start)


def _tiles(steps: list[Local], x: torch.Tensor, tile: int):
    """Run the local chain ``steps`` on x (B, C, H, W) one output tile (tile x tile, smaller at the far
    edges) at a time; yields (rows, cols, output tile (B, C', len(rows), len(cols)))."""
    hs, ws = _sizes(steps, x.shape[-2]), _sizes(steps, x.shape[-1])
    for top in range(0, hs[-1], tile):
        rows = _windows(steps, top, min(top + tile, hs[-1]), hs)
        for left in range(0, ws[-1], tile):
            cols = _windows(steps, left, min(left + tile, ws[-1]), ws)
            h = x[..., slice(*rows[0]), slice(*cols[0])]
            for step, r_in, r_out, c_in, c_out in zip(steps, rows, rows[1:], cols, cols[1:]):
                h = step(h)[..., _crop(step, r_in, r_out), _crop(step, c_in, c_out)]
            yield slice(*rows[-1]), slice(*cols[-1]), h


def _stitch(steps: list[Local], x: torch.Tensor, tile: int) -> torch.Tensor:
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


def _attention_state(block: EfficientViTBlock, x: torch.Tensor, tile: int) -> torch.Tensor:
    """``block.attention_state(x)``, summed tile by tile: the state of each tile's qkv, computed with its halo."""
    attn = block.attn
    tiles = _tiles([Local(attn.project_qkv, attn.halo)], x, tile)
    return sum(attn.qkv_state(qkv) for _, _, qkv in tiles)


def tiled(layers: list, x: torch.Tensor, tile_size: int, scale: int) -> torch.Tensor:
    """Run ``layers`` (`Local` layers and EfficientViT blocks, as `Encoder.layers` gives them) on x, whose
    pixels are ``scale`` image pixels wide, in tiles of ``tile_size`` image pixels: local chains tile by tile,
    stitched whole before each EfficientViT block."""
    chain = []
    for layer in layers:
        if isinstance(layer, EfficientViTBlock):
            x, chain = _stitch(chain, x, tile_size // scale), []
            state = _attention_state(layer, x, tile_size // scale)
            layer = Local(partial(layer, state=state), layer.halo)
        chain.append(layer)
        scale = scale * layer.halo.down // layer.halo.up
    return _stitch(chain, x, tile_size // scale)


def check_tiling(model: nn.Module, ratio: int, tile_size, tile_overlap) -> None:
    """Refuse, before any work, a ``tile_size`` that is not a positive multiple of ``ratio`` (the compression
    ratio, in image pixels), any ``tile_overlap``, and BatchNorm in training mode. Both None: untiled, no check."""
    if tile_size is None and tile_overlap is None:
        return
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size <= 0 or tile_size % ratio:
        raise ValueError(f"tile_size must be a positive multiple of the compression ratio {ratio} (image pixels), "
                         f"got {tile_size!r}")
    if tile_overlap is not None:
        raise ValueError("tile_overlap must be None: tiles read the exact halo their receptive field needs "
                         "(derived from the architecture), so the tiled output equals the untiled one")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise ValueError("tiling needs BatchNorm in eval mode (batch statistics are global): call model.eval()")
