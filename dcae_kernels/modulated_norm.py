"""adaLN-Zero's modulated LayerNorm between DiT sub-blocks, fused with the gated residual add before it.

Per token row n of sample b, over its C channels: ``h = res + gate * x`` (or ``res + x``, or ``x``), then
``y = (h - mean) * rstd * (1 + scale) + shift`` with ``mean = mean_c(h)``, ``rstd = rsqrt(mean_c((h - mean)^2) +
eps)``, computed in fp32 (fp64 for fp64) and rounded to x's dtype once. h is an output too: it is the running
residual stream the next sub-block adds to. The backward, with ``xhat = (h - mean) * rstd``, ``g = dy * (1 +
scale)`` and ``dh`` the upstream gradient of h: ``dh_total = dh + rstd * (u - mean_c(u))`` with ``u = g - xhat *
mean_c(g * xhat)`` (= g - mean_c(g) - xhat * mean_c(g * xhat), as mean_c(xhat) = 0; in this form an infinite g
makes the row NaN, as autograd through the reference does), ``dres = dh_total``, ``dx = gate * dh_total``, and per
sample ``dshift = sum_n dy``, ``dscale = sum_n dy * xhat``, ``dgate = sum_n dh_total * x``.

Programs tile (token blocks, batch) with channels contiguous (16-byte loads and stores along them). A tile is
[BN tokens, CP = next_pow2(C) channels], BN = BLOCK // CP (autotuned BLOCK, at least one row): a whole row
stays in registers, so every tensor is read once. The backward recomputes h from x and res (exact, and the
same reads as loading the stored h) and takes mean and rstd saved by the forward. Its programs loop over a
chunk of one sample's tokens (never two samples), summing dshift, dscale and dgate in registers; they store
them in a (3 (2 without a gate), B, programs per sample, C) buffer in the accumulation dtype which torch sums
over the programs in one reduction: no atomics, deterministic. ``eps`` is cast in the kernel (torch.compile
passes Python floats as fp64).
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import reference
from .backend import INTERPRET, run_triton
from .checks import check_eps, check_float_tensor, check_like
from .norm import FWD_CONFIGS
from .outputs import accumulation_dtype, new_output

# BLOCK = elements of one [BN, CP] tile: 32 per thread in the forward (norm.py's FWD_CONFIGS); 16 or 8 in the
# backward, which holds x, xhat, dy, dh_total and three per-channel sums (16 per thread take ~170 registers on
# sm_90: they spill at 16 warps). Configs whose tile is narrower than a row are pruned. The interpreter's small
# tiles make the tests cover tiles of several rows and of one, several backward chunks and partial ones.
_BWD_CONFIGS = [triton.Config({"BLOCK": 256})] if INTERPRET else [
    triton.Config({"BLOCK": 2048}, num_warps=4),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=16),
]
# The widest rows the kernels hold in registers (the configs that hold one compile for sm_90 without spills);
# wider ones run the reference.
MAX_CHANNELS = 4096
# The backward's programs: about this many, each summing its tokens' dshift, dscale and dgate in registers.
_BWD_PROGRAMS = 4 if INTERPRET else 256


@triton.jit
def _tile(i_b, o_n, N, C, CP: tl.constexpr):
    """Offsets [BN, CP] of tokens o_n (all channels) of batch i_b in a (B, N, C) tensor (int64), their mask,
    the channels and their mask."""
    o_c = tl.arange(0, CP)
    m_c = o_c < C
    o_x = (i_b * N + o_n)[:, None] * C + o_c[None, :]
    return o_x, (o_n < N)[:, None] & m_c[None, :], o_c, m_c


@triton.jit
def _residual_stream(x_ptr, res_ptr, b_gate, o_x, m_x, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
                     acc_ty: tl.constexpr):
    """x and h = res + gate * x (res + x without a gate, x without a residual) of a tile, in the accumulation
    dtype; 0 outside the mask."""
    b_x = tl.load(x_ptr + o_x, mask=m_x, other=0.0).to(acc_ty)
    b_h = b_x
    if HAS_RES:
        if HAS_GATE:
            b_h = b_h * b_gate[None, :]
        b_h += tl.load(res_ptr + o_x, mask=m_x, other=0.0).to(acc_ty)
    return b_x, b_h


def _whole_rows(configs, named_args, **kwargs):
    """The autotuner's configs whose tile holds at least one whole row of CP channels (else the largest)."""
    fitting = [c for c in configs if c.kwargs["BLOCK"] >= kwargs["CP"]]
    return fitting or [max(configs, key=lambda c: c.kwargs["BLOCK"])]


@triton.autotune(configs=FWD_CONFIGS, key=["N", "C", "HAS_RES", "HAS_GATE"],
                 prune_configs_by={"early_config_prune": _whole_rows})
@triton.jit
def modulated_layer_norm_fwd_kernel(
    x_ptr, res_ptr, shift_ptr, scale_ptr, gate_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr, eps, N, C,
    CP: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK: tl.constexpr,
):
    """x, res: (B, N, C), shift, scale, gate: (B, C) -> y, h: (B, N, C) (h only with a residual), mean, rstd:
    (B, N) in the accumulation dtype. h = res + gate * x, y = (h - mean) * rstd * (1 + scale) + shift."""
    BN: tl.constexpr = BLOCK // CP if BLOCK > CP else 1
    acc_ty: tl.constexpr = mean_ptr.dtype.element_ty
    i_n, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_n = i_n * BN + tl.arange(0, BN)
    o_x, m_x, o_c, m_c = _tile(i_b, o_n, N, C, CP)
    b_gate = tl.load(gate_ptr + i_b * C + o_c, mask=m_c, other=0.0).to(acc_ty)  # shift's without a gate
    _, b_h = _residual_stream(x_ptr, res_ptr, b_gate, o_x, m_x, HAS_RES, HAS_GATE, acc_ty)
    if HAS_RES:
        tl.store(h_ptr + o_x, b_h.to(h_ptr.dtype.element_ty), mask=m_x)
    b_mean = tl.sum(b_h, 1) / C
    b_d = tl.where(m_x, b_h - b_mean[:, None], 0.0)
    b_rstd = tl.math.rsqrt(tl.sum(b_d * b_d, 1) / C + tl.full([], eps, acc_ty))
    b_scale = tl.load(scale_ptr + i_b * C + o_c, mask=m_c, other=0.0).to(acc_ty)
    b_shift = tl.load(shift_ptr + i_b * C + o_c, mask=m_c, other=0.0).to(acc_ty)
    b_y = b_d * b_rstd[:, None] * (1 + b_scale[None, :]) + b_shift[None, :]
    tl.store(y_ptr + o_x, b_y.to(y_ptr.dtype.element_ty), mask=m_x)
    m_n = o_n < N
    tl.store(mean_ptr + i_b * N + o_n, b_mean, mask=m_n)
    tl.store(rstd_ptr + i_b * N + o_n, b_rstd, mask=m_n)


@triton.autotune(configs=_BWD_CONFIGS, key=["N", "C", "HAS_RES", "HAS_GATE", "HAS_DY", "HAS_DH"],
                 prune_configs_by={"early_config_prune": _whole_rows})
@triton.jit
def modulated_layer_norm_bwd_kernel(
    dy_ptr, dh_ptr, x_ptr, res_ptr, scale_ptr, gate_ptr, mean_ptr, rstd_ptr, dht_ptr, dx_ptr, part_ptr, N, C,
    CHUNK, CP: tl.constexpr, HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr, HAS_DY: tl.constexpr,
    HAS_DH: tl.constexpr, BLOCK: tl.constexpr,
):
    """dy, dh, x, res: (B, N, C), scale, gate: (B, C), mean, rstd: (B, N) -> dh_total: (B, N, C), dx = gate *
    dh_total (with a gate), and part: (2, or 3 with a gate, B, programs per sample, C), each program's partial
    dshift = sum_n dy, dscale = sum_n dy * xhat and dgate = sum_n dh_total * x over its CHUNK tokens.
    dh_total = dh + rstd * (u - mean_c(u)), u = g - xhat * mean_c(g * xhat), g = dy * (1 + scale)."""
    BN: tl.constexpr = BLOCK // CP if BLOCK > CP else 1
    acc_ty: tl.constexpr = mean_ptr.dtype.element_ty
    i_p, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_c = tl.arange(0, CP)
    m_c = o_c < C
    b_scale1 = 1 + tl.load(scale_ptr + i_b * C + o_c, mask=m_c, other=0.0).to(acc_ty)
    b_gate = tl.load(gate_ptr + i_b * C + o_c, mask=m_c, other=0.0).to(acc_ty)  # scale's without a gate
    b_dshift = tl.zeros([CP], dtype=acc_ty)
    b_dscale = tl.zeros([CP], dtype=acc_ty)
    b_dgate = tl.zeros([CP], dtype=acc_ty)
    for n0 in range(i_p * CHUNK, tl.minimum(N, i_p * CHUNK + CHUNK), BN):
        o_n = n0 + tl.arange(0, BN)
        o_x, m_x, _, _ = _tile(i_b, o_n, N, C, CP)
        b_x, b_h = _residual_stream(x_ptr, res_ptr, b_gate, o_x, m_x, HAS_RES, HAS_GATE, acc_ty)
        b_mean = tl.load(mean_ptr + i_b * N + o_n, mask=o_n < N, other=0.0)
        b_rstd = tl.load(rstd_ptr + i_b * N + o_n, mask=o_n < N, other=0.0)
        b_xhat = tl.where(m_x, (b_h - b_mean[:, None]) * b_rstd[:, None], 0.0)
        if HAS_DH:
            b_dht = tl.load(dh_ptr + o_x, mask=m_x, other=0.0).to(acc_ty)
        else:
            b_dht = tl.zeros([BN, CP], dtype=acc_ty)
        if HAS_DY:
            b_dy = tl.load(dy_ptr + o_x, mask=m_x, other=0.0).to(acc_ty)
            b_g = b_dy * b_scale1[None, :]
            b_u = b_g - b_xhat * (tl.sum(b_g * b_xhat, 1) / C)[:, None]
            b_u = tl.where(m_x, b_u, 0.0)
            b_dht += b_rstd[:, None] * (b_u - (tl.sum(b_u, 1) / C)[:, None])
            b_dshift += tl.sum(b_dy, 0)
            b_dscale += tl.sum(b_dy * b_xhat, 0)
        tl.store(dht_ptr + o_x, b_dht.to(dht_ptr.dtype.element_ty), mask=m_x)
        if HAS_GATE:
            tl.store(dx_ptr + o_x, (b_dht * b_gate[None, :]).to(dx_ptr.dtype.element_ty), mask=m_x)
            b_dgate += tl.sum(b_dht * b_x, 0)
    programs = tl.num_programs(0) * tl.num_programs(1)
    i_prog = i_b * tl.num_programs(0) + i_p
    tl.store(part_ptr + i_prog * C + o_c, b_dshift, mask=m_c)
    tl.store(part_ptr + (programs + i_prog) * C + o_c, b_dscale, mask=m_c)
    if HAS_GATE:
        tl.store(part_ptr + (2 * programs + i_prog) * C + o_c, b_dgate, mask=m_c)


def _rows(block: int, cp: int) -> int:
    """BN of a config, as the kernels derive it."""
    return max(block // cp, 1)


@triton_op("dcae::modulated_layer_norm", mutates_args=())
def _modulated_layer_norm_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (B, N, C), shift, scale, gate: (B, C) -> (y (B, N, C), h (B, N, C), or empty without a
    residual, mean (B, N), rstd (B, N) in the accumulation dtype)."""
    batch, tokens, channels = x.shape
    acc = accumulation_dtype(x)
    if x.numel() == 0:
        h = x.new_empty(0) if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
        return (torch.empty_like(x, memory_format=torch.contiguous_format), h,
                x.new_zeros((batch, tokens), dtype=acc), x.new_zeros((batch, tokens), dtype=acc))
    x = x.contiguous()
    y = new_output(x, x.shape)
    h = x.new_empty(0) if residual is None else new_output(x, x.shape)
    mean, rstd = new_output(x, (batch, tokens), acc), new_output(x, (batch, tokens), acc)
    cp = triton.next_power_of_2(channels)
    grid = lambda m: (triton.cdiv(tokens, _rows(m["BLOCK"], cp)), batch)  # noqa: E731
    wrap_triton(modulated_layer_norm_fwd_kernel)[grid](
        x, x if residual is None else residual.contiguous(), shift.contiguous(), scale.contiguous(),
        shift if gate is None else gate.contiguous(), y, x if residual is None else h, mean, rstd, eps, tokens,
        channels, CP=cp, HAS_RES=residual is not None, HAS_GATE=gate is not None)
    return y, h, mean, rstd


@triton_op("dcae::modulated_layer_norm_bwd", mutates_args=())
def _modulated_layer_norm_bwd_op(
    grad_y: torch.Tensor | None, grad_h: torch.Tensor | None, x: torch.Tensor, scale: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, residual: torch.Tensor | None = None, gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of h's total use, dh_total (B, N, C): the gradient of the residual, and of x without a gate;
    with a gate, that of x (gate * dh_total, else empty); and those of shift, scale and the gate stacked (2 or 3
    with a gate, B, C) in scale's dtype (one tensor: the per-sample sums of all three take one reduction).
    grad_y, grad_h (B, N, C) are the upstream gradients of y and h (None: zero)."""
    batch, tokens, channels = x.shape
    with_gate = gate is not None
    if x.numel() == 0 or (grad_y is None and grad_h is None):
        return (torch.zeros_like(x, memory_format=torch.contiguous_format),
                torch.zeros_like(x, memory_format=torch.contiguous_format) if with_gate else x.new_empty(0),
                scale.new_zeros((2 + with_gate, batch, channels)))
    x = x.contiguous()
    dht = new_output(x, x.shape)
    dx = new_output(x, x.shape) if with_gate else x.new_empty(0)
    cp = triton.next_power_of_2(channels)
    # a power of two >= every config's BN, so that a chunk is whole tiles
    chunk = max(max(_rows(c.kwargs["BLOCK"], cp) for c in _BWD_CONFIGS),
                triton.next_power_of_2(triton.cdiv(batch * tokens, _BWD_PROGRAMS)))
    grid = (triton.cdiv(tokens, chunk), batch)
    partials = new_output(x, (2 + with_gate, batch, grid[0], channels), mean.dtype)
    wrap_triton(modulated_layer_norm_bwd_kernel)[grid](
        x if grad_y is None else grad_y.contiguous(), x if grad_h is None else grad_h.contiguous(), x,
        x if residual is None else residual.contiguous(), scale.contiguous(),
        scale if gate is None else gate.contiguous(), mean, rstd, dht, x if dx.numel() == 0 else dx, partials,
        tokens, channels, chunk, CP=cp, HAS_RES=residual is not None, HAS_GATE=with_gate,
        HAS_DY=grad_y is not None, HAS_DH=grad_h is not None)
    return dht, dx, partials.sum(2).to(scale.dtype)


def _setup_context(ctx, inputs, output):
    x, _, scale, _, residual, gate = inputs
    _, h, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd, *([h] if residual is None else []))
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, scale, mean, rstd, residual, gate)


def _backward(ctx, grad_y, grad_h, _, __):
    x, scale, mean, rstd, residual, gate = ctx.saved_tensors
    need = ctx.needs_input_grad  # x, shift, scale, eps, residual, gate
    if residual is None:
        grad_h = None  # h is x itself, outside the op; the op's h is empty
    if (grad_y is None and grad_h is None) or not any(need):
        return None, None, None, None, None, None
    dht, dx, dmod = torch.ops.dcae.modulated_layer_norm_bwd(grad_y, grad_h, x, scale, mean, rstd, residual, gate)
    grads = (dht if gate is None else dx, dmod[0], dmod[1], None, dht, dmod[2] if gate is not None else None)
    return tuple(g if n else None for g, n in zip(grads, need))


_modulated_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, shift, scale, eps, residual, gate) -> None:
    check_float_tensor("x", x, 3, "(B, N, C)")
    batch, _, channels = x.shape
    layout = f"(B, C) = ({batch}, {channels})"
    check_float_tensor("shift", shift, 2, layout)
    if shift.device != x.device:
        raise ValueError(f"shift is on {shift.device} but x is on {x.device}: put both on one device")
    if tuple(shift.shape) != (batch, channels):
        raise ValueError(f"shift must have shape {layout}, x's batch and channel counts, got {tuple(shift.shape)}")
    check_like("scale", scale, "shift", shift, (batch, channels))
    check_eps(eps)
    if residual is not None:
        check_like("residual", residual, "x", x, x.shape)
    if gate is not None:
        if residual is None:
            raise ValueError("gate needs a residual: h = residual + gate * x (pass residual, or gate=None)")
        check_like("gate", gate, "shift", shift, (batch, channels))


def _run_triton(x: torch.Tensor) -> bool:
    """Triton as for every op (`run_triton`), for rows of up to MAX_CHANNELS."""
    return run_triton(x) and x.shape[-1] <= MAX_CHANNELS


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                         residual: torch.Tensor | None = None,
                         gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """adaLN-Zero's step between DiT sub-blocks: the gated residual add, then the modulated LayerNorm.

    x: (B, N, C) (a sub-block's output), residual: (B, N, C) in x's dtype (the running stream) or None,
    shift, scale, gate: (B, C) in one float dtype (may differ from x's) -> (y, h), both (B, N, C) in x's dtype.
    h = residual + gate * x (gate None: gate = 1; a gate without a residual is an error; no residual: h is x
    itself), y = LayerNorm_C(h) * (1 + scale) + shift (biased variance, eps inside the rsqrt, no affine
    weights), in fp32 (fp64 for fp64) and rounded once.
    """
    _check(x, shift, scale, eps, residual, gate)
    if _run_triton(x):
        y, h, _, _ = torch.ops.dcae.modulated_layer_norm(x, shift, scale, float(eps), residual, gate)
        return y, x if residual is None else h
    return reference.modulated_layer_norm(x, shift, scale, eps, residual, gate)
