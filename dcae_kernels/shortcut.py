"""DC-AE residual-autoencoding shortcuts, optionally fused with the residual add.

Down, ``space_to_channel_avg``: pixel_unshuffle by ``f`` (unshuffled channel ``u = c*f*f + i*f + j``), then the
mean of each group of ``G = C*f*f/C_out`` consecutive unshuffled channels. Up, ``channel_to_space_dup``:
repeat every channel ``R = C_out*f*f/C`` times, then pixel_shuffle by ``f``.

Each op is the other's adjoint: d(down)/dx = up(dy) / G and d(up)/dx = down(dy) * R, so the two kernels
below serve forward and backward. Both see the high-resolution tensor as rows of the "unshuffled" index
``t = c*f + i`` (channel, sub-row) and move whole row segments, so loads and stores along W stay contiguous.
``scale`` (1/G in the backward) enters the kernels as ``tl.full([], scale, acc)``: exact for fp64 under the
interpreter (``tl.cast`` of a Python float rounds it to fp32 first), converted once where torch.compile passes
Python floats as fp64 scalars.
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import reference
from .backend import INTERPRET, run_triton
from .checks import check_float_tensor, check_like, check_positive_int
from .outputs import new_output

# Elements of the high-resolution tile per row load; the low-resolution tile is BLOCK // f of them.
_CONFIGS = [triton.Config({"BLOCK": 1024})] if INTERPRET else [
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 8192}, num_warps=8),
]
_MIN_BLOCK = min(c.kwargs["BLOCK"] for c in _CONFIGS)
MAX_FACTOR = 1024  # <= _MIN_BLOCK: a program's row segment (BW * next_pow2(f) elements) fits in every BLOCK
_KEY = ["HL", "WL", "F", "GROUP", "HAS_RES"]


@triton.jit
def _tile(HL, WL, F: tl.constexpr, FP: tl.constexpr, BW: tl.constexpr, BH: tl.constexpr):
    """This program's share: ``bg`` = batch * channel groups + group, low-res rows ``o_h`` [BH] and columns
    ``o_w`` [BW], high-res columns ``col`` [BW*FP] (col = w*F + j, j < F), and their masks."""
    pid = tl.program_id(0).to(tl.int64)
    n_wblk = tl.cdiv(WL, BW)
    n_hblk = tl.cdiv(HL, BH)
    wblk = (pid % n_wblk).to(tl.int32)
    hblk = ((pid // n_wblk) % n_hblk).to(tl.int32)
    bg = pid // (n_wblk * n_hblk)
    o_h = hblk * BH + tl.arange(0, BH)
    o_w = wblk * BW + tl.arange(0, BW)
    o_e = tl.arange(0, BW * FP)
    if FP == F:
        col = wblk * BW * F + o_e
        m_col = col < WL * F
    else:
        col = (wblk * BW + o_e // FP) * F + o_e % FP
        m_col = (o_e % FP < F) & (col < WL * F)
    return bg, o_h, o_h < HL, o_w, o_w < WL, col, m_col


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def space_to_channel_avg_kernel(
    x_ptr, res_ptr, y_ptr, HL, WL, scale,
    F: tl.constexpr, FP: tl.constexpr, GROUP: tl.constexpr, NC: tl.constexpr, NR: tl.constexpr,
    BW: tl.constexpr, HAS_RES: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """x: (B, C, HL*F, WL*F) -> y: (B, C_out, HL, WL); y = scale * group_mean(unshuffle(x)) (+ res).

    One program: NC output channels (NC*GROUP unshuffled channels = NR whole rows t = c*F + i)
    x a [BH, BW] tile of output pixels. FP = next power of two >= F.
    """
    BH: tl.constexpr = BLOCK // (BW * FP)
    acc_ty: tl.constexpr = tl.float64 if FP64 else tl.float32
    W = WL * F
    bg, o_h, m_h, o_w, m_w, col, m_col = _tile(HL, WL, F, FP, BW, BH)
    o_j = tl.arange(0, BW * FP) % FP
    m_x = m_h[:, None] & m_col[None, :]
    m_y = m_h[:, None] & m_w[None, :]

    for n in tl.static_range(NC):
        b_acc = tl.zeros([BH, BW], dtype=acc_ty)
        # rows whose unshuffled channels r*F + j fall in [n*GROUP, (n+1)*GROUP)
        for r in tl.static_range((n * GROUP) // F, ((n + 1) * GROUP - 1) // F + 1):
            t = bg * NR + r
            p_x = x_ptr + (t // F) * HL * F * W + ((o_h * F + (t % F).to(tl.int32)) * W)[:, None] + col[None, :]
            b_x = tl.load(p_x, mask=m_x, other=0.0).to(acc_ty)
            o_u = r * F + o_j
            m_u = (o_u >= n * GROUP) & (o_u < (n + 1) * GROUP)
            b_x = tl.where(m_u[None, :], b_x, 0.0)
            b_acc += tl.sum(tl.reshape(b_x, [BH, BW, FP]), axis=2)
        b_y = b_acc * (tl.full([], scale, acc_ty) / GROUP)
        o_y = (bg * NC + n) * HL * WL + (o_h * WL)[:, None] + o_w[None, :]
        if HAS_RES:
            b_y += tl.load(res_ptr + o_y, mask=m_y, other=0.0).to(acc_ty)
        tl.store(y_ptr + o_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def channel_to_space_dup_kernel(
    x_ptr, res_ptr, y_ptr, HL, WL, scale,
    F: tl.constexpr, FP: tl.constexpr, GROUP: tl.constexpr, NC: tl.constexpr, NR: tl.constexpr,
    BW: tl.constexpr, HAS_RES: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr,
):
    """x: (B, C, HL, WL) -> y: (B, C_out, HL*F, WL*F); y = scale * shuffle(repeat(x, GROUP)) (+ res).

    One program: NC input channels (NC*GROUP output unshuffled channels = NR whole output rows
    t = c*F + i) x a [BH, BW] tile of input pixels, written as [BH, BW*F] contiguous output row segments.
    """
    BH: tl.constexpr = BLOCK // (BW * FP)
    acc_ty: tl.constexpr = tl.float64 if FP64 else tl.float32
    W = WL * F
    bg, o_h, m_h, o_w, m_w, col, m_col = _tile(HL, WL, F, FP, BW, BH)
    o_j = tl.arange(0, FP)
    m_x = m_h[:, None] & m_w[None, :]
    o_x = (o_h * WL)[:, None] + o_w[None, :]
    m_y = m_h[:, None] & m_col[None, :]

    for r in tl.static_range(NR):
        b_rep = tl.zeros([BH, BW, FP], dtype=acc_ty)
        # input channels n feeding unshuffled channels r*F + j: n = (r*F + j) // GROUP
        for n in tl.static_range((r * F) // GROUP, (r * F + F - 1) // GROUP + 1):
            b_x = tl.load(x_ptr + (bg * NC + n) * HL * WL + o_x, mask=m_x, other=0.0).to(acc_ty)
            m_n = (r * F + o_j) // GROUP == n
            b_rep = tl.where(m_n[None, None, :], b_x[:, :, None], b_rep)
        b_y = tl.reshape(b_rep, [BH, BW * FP]) * tl.full([], scale, acc_ty)
        t = bg * NR + r
        o_y = (t // F) * HL * F * W + ((o_h * F + (t % F).to(tl.int32)) * W)[:, None] + col[None, :]
        if HAS_RES:
            b_y += tl.load(res_ptr + o_y, mask=m_y, other=0.0).to(acc_ty)
        tl.store(y_ptr + o_y, b_y.to(y_ptr.dtype.element_ty), mask=m_y)


def _tiling(group: int, factor: int) -> tuple[int, int]:
    """(channels on the low-res side, whole high-res rows) that one program covers: ch * group = rows * f."""
    channels = factor // math.gcd(group, factor)
    return channels, channels * group // factor


def _launch(kernel, x: torch.Tensor, residual, y: torch.Tensor, group: int, factor: int, scale: float,
            low: torch.Tensor) -> None:
    """Launch ``kernel`` on contiguous tensors; ``low`` is the low-resolution one of x / y."""
    channels, rows = _tiling(group, factor)
    batch, c_low, hl, wl = low.shape
    fp = triton.next_power_of_2(factor)
    bw = min(triton.next_power_of_2(wl), max(1, _MIN_BLOCK // fp))
    n_programs = batch * (c_low // channels) * triton.cdiv(wl, bw)
    grid = lambda meta: (n_programs * triton.cdiv(hl, meta["BLOCK"] // (bw * fp)),)  # noqa: E731
    wrap_triton(kernel)[grid](
        x, x if residual is None else residual, y, hl, wl, scale,
        F=factor, FP=fp, GROUP=group, BW=bw, HAS_RES=residual is not None,
        NC=channels, NR=rows, FP64=x.dtype == torch.float64,
    )


@triton_op("dcae::space_to_channel_avg", mutates_args=())
def _space_to_channel_avg_op(x: torch.Tensor, out_channels: int, factor: int,
                             residual: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """x: (B, C, H, W) -> (B, out_channels, H/f, W/f): scale * space_to_channel_avg(x) (+ residual)."""
    batch, channels, height, width = x.shape
    y = new_output(x, (batch, out_channels, height // factor, width // factor))
    if y.numel() == 0:
        return y
    residual = None if residual is None else residual.contiguous()
    _launch(space_to_channel_avg_kernel, x.contiguous(), residual, y,
            channels * factor * factor // out_channels, factor, scale, low=y)
    return y


@triton_op("dcae::channel_to_space_dup", mutates_args=())
def _channel_to_space_dup_op(x: torch.Tensor, out_channels: int, factor: int,
                             residual: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """x: (B, C, H, W) -> (B, out_channels, H*f, W*f): scale * channel_to_space_dup(x) (+ residual)."""
    batch, channels, height, width = x.shape
    y = new_output(x, (batch, out_channels, height * factor, width * factor))
    if y.numel() == 0:
        return y
    residual = None if residual is None else residual.contiguous()
    x = x.contiguous()
    _launch(channel_to_space_dup_kernel, x, residual, y,
            out_channels * factor * factor // channels, factor, scale, low=x)
    return y


def _setup_context(ctx, inputs, output):
    x, out_channels, factor, residual, scale = inputs
    ctx.channels, ctx.out_channels, ctx.factor, ctx.scale = x.shape[1], out_channels, factor, scale
    ctx.has_residual = residual is not None


def _space_to_channel_avg_backward(ctx, grad):
    """dx = scale / G * channel_to_space_dup(dy)."""
    grad_x = None
    if ctx.needs_input_grad[0]:
        group = ctx.channels * ctx.factor * ctx.factor // ctx.out_channels
        grad_x = torch.ops.dcae.channel_to_space_dup(grad, ctx.channels, ctx.factor, None, ctx.scale / group)
    return grad_x, None, None, grad if ctx.has_residual else None, None


def _channel_to_space_dup_backward(ctx, grad):
    """dx = scale * R * space_to_channel_avg(dy) (the sum over each channel's R copies)."""
    grad_x = None
    if ctx.needs_input_grad[0]:
        repeats = ctx.out_channels * ctx.factor * ctx.factor // ctx.channels
        grad_x = torch.ops.dcae.space_to_channel_avg(grad, ctx.channels, ctx.factor, None, ctx.scale * repeats)
    return grad_x, None, None, grad if ctx.has_residual else None, None


_space_to_channel_avg_op.register_autograd(_space_to_channel_avg_backward, setup_context=_setup_context)
_channel_to_space_dup_op.register_autograd(_channel_to_space_dup_backward, setup_context=_setup_context)

def _check(x, out_channels, factor, residual, down: bool):
    check_float_tensor("x", x, 4, "(B, C, H, W)")
    check_positive_int("out_channels", out_channels)
    check_positive_int("factor", factor, MAX_FACTOR)
    batch, channels, height, width = x.shape
    if down:
        if height % factor or width % factor:
            raise ValueError(f"x's height and width must be divisible by factor={factor}, got {height}x{width}")
        if channels * factor * factor % out_channels or channels * factor * factor < out_channels:
            raise ValueError(
                f"out_channels must divide C*factor*factor = {channels}*{factor}*{factor} "
                f"(the channel-group size G = C*f*f/out_channels must be an integer >= 1), got {out_channels}")
        out_shape = (batch, out_channels, height // factor, width // factor)
    else:
        if channels == 0 or out_channels * factor * factor % channels:
            raise ValueError(
                f"x's channel count C={channels} must divide out_channels*factor*factor = "
                f"{out_channels}*{factor}*{factor} (the repeat count R must be an integer >= 1)")
        out_shape = (batch, out_channels, height * factor, width * factor)
    if residual is not None:
        check_like("residual", residual, "x", x, out_shape)


def space_to_channel_avg(x: torch.Tensor, out_channels: int, factor: int = 2,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """Space-to-channel + channel-averaging shortcut (DC-AE downsample), optionally fused with an add.

    x: (B, C, H, W), residual: (B, out_channels, H/f, W/f) or None -> (B, out_channels, H/f, W/f).
    y = pixel_unshuffle(x, f).view(B, out_channels, G, H/f, W/f).mean(2) + residual, G = C*f*f/out_channels.
    """
    _check(x, out_channels, factor, residual, down=True)
    if run_triton(x):
        return torch.ops.dcae.space_to_channel_avg(x, out_channels, factor, residual)
    return reference.space_to_channel_avg(x, out_channels, factor, residual)


def channel_to_space_dup(x: torch.Tensor, out_channels: int, factor: int = 2,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """Channel-to-space + channel-duplicating shortcut (DC-AE upsample), optionally fused with an add.

    x: (B, C, H, W), residual: (B, out_channels, H*f, W*f) or None -> (B, out_channels, H*f, W*f).
    y = pixel_shuffle(x.repeat_interleave(R, dim=1), f) + residual, R = out_channels*f*f/C.
    """
    _check(x, out_channels, factor, residual, down=False)
    if run_triton(x):
        return torch.ops.dcae.channel_to_space_dup(x, out_channels, factor, residual)
    return reference.channel_to_space_dup(x, out_channels, factor, residual)
