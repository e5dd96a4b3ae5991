"""EfficientViT / Sana ReLU linear attention, forward and backward, in two layouts.

Per (batch, head), with ``q~ = relu(q)``, ``k~ = relu(k)`` (N tokens x D channels each) and the state
``S = [v; 1]^T k~`` ((D+1) x D: rows i < D hold ``A[i, j] = sum_n v[n, i] k~[n, j]``, row D holds
``z[j] = sum_n k~[n, j]``), the output is ``o[n] = A q~[n] / (z . q~[n] + eps)``.

Forward: one program per (N-chunk, head) sums its chunk's partial state, torch sums the partials (no atomics,
so the result is deterministic), and a second kernel applies the state to q~ tile by tile. Backward, with
``den = z . q~ + eps`` and ``g = A^T do``: ``dq~ = g / den - (q~ . g) / den^2 * z`` and the state gradient
``dS = [do / den, -(q~ . g) / den^2]^T q~`` (partials per chunk, summed by torch), then
``dk~ = v dA + dz`` and ``dv = k~ dA^T``. Every input is read once per pass and every output written once.
For N <= head_dim (up to 64) one program per head runs the authors' quadratic form instead (same function,
different rounding: e.g. at N = 1 it returns v and a zero dq exactly).

Every sum accumulates in fp32 (fp64 for fp64 inputs), so large fp16 inputs cannot overflow. ``eps`` is cast to
the accumulation dtype in the kernels: torch.compile passes Python floats to Triton kernels as fp64. Products of two
fp16/bf16 tiles are exact; products with fp32 operands (the state, fp32 inputs) run on tf32 tensor cores:
10-bit mantissas, ~5e-4 relative, at or below the fp16/bf16 output rounding. fp64 inputs use IEEE fp64.
"""
import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import reference
from .backend import INTERPRET, use_triton
from .checks import check_float_tensor, check_like, check_positive_int
from .outputs import accumulation_dtype, new_output

MAX_HEAD_DIM = 128
# BLOCK = elements of one [BN, BD] token tile, so a program streams BN = BLOCK // BD tokens per step.
_CONFIGS = [triton.Config({"BLOCK": 1024})] if INTERPRET else [
    triton.Config({"BLOCK": 2048}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK": 4096}, num_warps=8, num_stages=2),
]
_KEY = ["BD", "TOKENS"]
# Chunks are whole tiles for every config (BD >= 16).
_MIN_CHUNK = max(c.kwargs["BLOCK"] for c in _CONFIGS) // 16


@triton.jit
def _relu(x):
    """max(x, 0) in x's own dtype, for tl.dot operands (Triton 3.6's tl.maximum turns bf16 into fp32)."""
    return tl.where(x > 0, x, tl.zeros_like(x))


@triton.jit
def _head(ptr, i_bh, N, H, D: tl.constexpr, PART: tl.constexpr, PARTS: tl.constexpr, TOKENS: tl.constexpr):
    """Pointer to token 0, channel 0 of head ``i_bh`` (= batch * H + head) in one of the two layouts.

    Channels first (TOKENS=False): (B*H, PARTS, D, N), the head's PART-th block of D channels.
    Tokens (TOKENS=True): (B, N, H, D), one tensor per part.
    """
    if TOKENS:
        return ptr + (i_bh // H) * N * H * D + (i_bh % H) * D
    return ptr + (i_bh * PARTS + PART) * D * N


@triton.jit
def _tile(i_n, N, H, D: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, TOKENS: tl.constexpr):
    """Offsets from a head's base of tokens [i_n, i_n + BN) x channels [0, BD), as [BN, BD], and their mask."""
    o_n = i_n + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m = (o_n < N)[:, None] & (o_d < D)[None, :]
    if TOKENS:
        return o_n[:, None] * (H * D) + o_d[None, :], m
    return o_n[:, None] + o_d[None, :] * N, m


@triton.jit
def _state(s_ptr, D: tl.constexpr, BD: tl.constexpr, TRANS: tl.constexpr):
    """Load a (D+1, D) state: its first D rows as [BD, BD] (transposed if TRANS) and its last row as [BD]."""
    o_a = tl.arange(0, BD)
    m_a = o_a < D
    m = m_a[:, None] & m_a[None, :]
    if TRANS:
        b_a = tl.load(s_ptr + o_a[:, None] + o_a[None, :] * D, mask=m, other=0.0)
    else:
        b_a = tl.load(s_ptr + o_a[:, None] * D + o_a[None, :], mask=m, other=0.0)
    return b_a, tl.load(s_ptr + D * D + o_a, mask=m_a, other=0.0)


@triton.jit
def _store_state(s_ptr, b_a, b_z, D: tl.constexpr, BD: tl.constexpr):
    """Store [BD, BD] rows and a [BD] last row into a (D+1, D) state."""
    o_a = tl.arange(0, BD)
    m_a = o_a < D
    tl.store(s_ptr + o_a[:, None] * D + o_a[None, :], b_a, mask=m_a[:, None] & m_a[None, :])
    tl.store(s_ptr + D * D + o_a, b_z, mask=m_a)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def relu_linear_attention_fwd_state_kernel(
    k_ptr, v_ptr, s_ptr, N, H, CHUNK,
    D: tl.constexpr, BD: tl.constexpr, TOKENS: tl.constexpr, PREC: tl.constexpr, BLOCK: tl.constexpr,
):
    """k, v: (N, D) per head -> s: (B*H, NC, D+1, D), chunk c's partial state [v; 1]^T relu(k)."""
    BN: tl.constexpr = BLOCK // BD
    acc_ty: tl.constexpr = s_ptr.dtype.element_ty
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    p_k = _head(k_ptr, i_bh, N, H, D, 1, 3, TOKENS)
    p_v = _head(v_ptr, i_bh, N, H, D, 2, 3, TOKENS)
    b_a = tl.zeros([BD, BD], dtype=acc_ty)
    b_z = tl.zeros([BD], dtype=acc_ty)
    for i_n in range(i_c * CHUNK, tl.minimum(N, i_c * CHUNK + CHUNK), BN):
        o_t, m_t = _tile(i_n, N, H, D, BN, BD, TOKENS)
        b_k = _relu(tl.load(p_k + o_t, mask=m_t, other=0.0))
        b_v = tl.load(p_v + o_t, mask=m_t, other=0.0)
        # [BD, BN] @ [BN, BD] -> [BD, BD]
        b_a = tl.dot(tl.trans(b_v), b_k, b_a, input_precision=PREC)
        b_z += tl.sum(b_k.to(acc_ty), 0)
    _store_state(s_ptr + (i_bh * tl.num_programs(0) + i_c) * (D + 1) * D, b_a, b_z, D, BD)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def relu_linear_attention_fwd_kernel(
    q_ptr, s_ptr, o_ptr, eps, N, H, CHUNK,
    D: tl.constexpr, BD: tl.constexpr, TOKENS: tl.constexpr, PREC: tl.constexpr, BLOCK: tl.constexpr,
):
    """q: (N, D) per head, s: (B*H, D+1, D) -> o: (N, D); o[n] = A q~[n] / (z . q~[n] + eps)."""
    BN: tl.constexpr = BLOCK // BD
    acc_ty: tl.constexpr = s_ptr.dtype.element_ty
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    p_q = _head(q_ptr, i_bh, N, H, D, 0, 3, TOKENS)
    p_o = _head(o_ptr, i_bh, N, H, D, 0, 1, TOKENS)
    b_at, b_z = _state(s_ptr + i_bh * (D + 1) * D, D, BD, True)
    for i_n in range(i_c * CHUNK, tl.minimum(N, i_c * CHUNK + CHUNK), BN):
        o_t, m_t = _tile(i_n, N, H, D, BN, BD, TOKENS)
        b_q = tl.maximum(tl.load(p_q + o_t, mask=m_t, other=0.0).to(acc_ty), 0.0)
        # [BN, BD] @ [BD, BD] -> [BN, BD]
        b_num = tl.dot(b_q, b_at, input_precision=PREC)
        b_den = tl.sum(b_q * b_z[None, :], 1) + tl.cast(eps, acc_ty)
        tl.store(p_o + o_t, (b_num / b_den[:, None]).to(o_ptr.dtype.element_ty), mask=m_t)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def relu_linear_attention_bwd_dq_kernel(
    q_ptr, do_ptr, s_ptr, dq_ptr, ds_ptr, eps, N, H, CHUNK,
    D: tl.constexpr, BD: tl.constexpr, TOKENS: tl.constexpr, PREC: tl.constexpr, BLOCK: tl.constexpr,
):
    """q, do: (N, D) per head, s: (B*H, D+1, D) -> dq: (N, D), ds: (B*H, NC, D+1, D) partial state grads."""
    BN: tl.constexpr = BLOCK // BD
    acc_ty: tl.constexpr = s_ptr.dtype.element_ty
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    p_q = _head(q_ptr, i_bh, N, H, D, 0, 3, TOKENS)
    p_do = _head(do_ptr, i_bh, N, H, D, 0, 1, TOKENS)
    p_dq = _head(dq_ptr, i_bh, N, H, D, 0, 3, TOKENS)
    b_a, b_z = _state(s_ptr + i_bh * (D + 1) * D, D, BD, False)
    b_da = tl.zeros([BD, BD], dtype=acc_ty)
    b_dz = tl.zeros([BD], dtype=acc_ty)
    for i_n in range(i_c * CHUNK, tl.minimum(N, i_c * CHUNK + CHUNK), BN):
        o_t, m_t = _tile(i_n, N, H, D, BN, BD, TOKENS)
        b_q = tl.load(p_q + o_t, mask=m_t, other=0.0)
        b_qr = tl.maximum(b_q.to(acc_ty), 0.0)
        b_do = tl.load(p_do + o_t, mask=m_t, other=0.0).to(acc_ty)
        b_den = tl.sum(b_qr * b_z[None, :], 1) + tl.cast(eps, acc_ty)
        # g = A^T do: [BN, BD] @ [BD, BD] -> [BN, BD]
        b_g = tl.dot(b_do, b_a, input_precision=PREC)
        b_dden = -tl.sum(b_qr * b_g, 1) / (b_den * b_den)
        b_dq = tl.where(b_q > 0, b_g / b_den[:, None] + b_dden[:, None] * b_z[None, :], 0.0)
        tl.store(p_dq + o_t, b_dq.to(dq_ptr.dtype.element_ty), mask=m_t)
        # dA += (do / den)^T q~: [BD, BN] @ [BN, BD] -> [BD, BD]
        b_da = tl.dot(tl.trans(b_do / b_den[:, None]), b_qr, b_da, input_precision=PREC)
        b_dz += tl.sum(b_dden[:, None] * b_qr, 0)
    _store_state(ds_ptr + (i_bh * tl.num_programs(0) + i_c) * (D + 1) * D, b_da, b_dz, D, BD)


@triton.autotune(configs=_CONFIGS, key=_KEY)
@triton.jit
def relu_linear_attention_bwd_dkv_kernel(
    k_ptr, v_ptr, ds_ptr, dk_ptr, dv_ptr, N, H, CHUNK,
    D: tl.constexpr, BD: tl.constexpr, TOKENS: tl.constexpr, PREC: tl.constexpr, BLOCK: tl.constexpr,
):
    """k, v: (N, D) per head, ds: (B*H, D+1, D) -> dk = relu'(k) * (v dA + dz), dv = relu(k) dA^T."""
    BN: tl.constexpr = BLOCK // BD
    acc_ty: tl.constexpr = ds_ptr.dtype.element_ty
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    p_k = _head(k_ptr, i_bh, N, H, D, 1, 3, TOKENS)
    p_v = _head(v_ptr, i_bh, N, H, D, 2, 3, TOKENS)
    p_dk = _head(dk_ptr, i_bh, N, H, D, 1, 3, TOKENS)
    p_dv = _head(dv_ptr, i_bh, N, H, D, 2, 3, TOKENS)
    b_da, b_dz = _state(ds_ptr + i_bh * (D + 1) * D, D, BD, False)
    b_dat, _ = _state(ds_ptr + i_bh * (D + 1) * D, D, BD, True)
    for i_n in range(i_c * CHUNK, tl.minimum(N, i_c * CHUNK + CHUNK), BN):
        o_t, m_t = _tile(i_n, N, H, D, BN, BD, TOKENS)
        b_k = tl.load(p_k + o_t, mask=m_t, other=0.0)
        b_v = tl.load(p_v + o_t, mask=m_t, other=0.0).to(acc_ty)
        # [BN, BD] @ [BD, BD] -> [BN, BD]
        b_dk = tl.where(b_k > 0, tl.dot(b_v, b_da, input_precision=PREC) + b_dz[None, :], 0.0)
        b_dv = tl.dot(tl.maximum(b_k.to(acc_ty), 0.0), b_dat, input_precision=PREC)
        tl.store(p_dk + o_t, b_dk.to(dk_ptr.dtype.element_ty), mask=m_t)
        tl.store(p_dv + o_t, b_dv.to(dv_ptr.dtype.element_ty), mask=m_t)


@triton.jit
def relu_linear_attention_quadratic_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, s_ptr, eps, N, H,
    D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, TOKENS: tl.constexpr, PREC: tl.constexpr,
):
    """N <= D, the authors' quadratic form, one program per head: q, k, v: (N, D) -> o: (N, D), s: (D+1, D).

    att = relu(k) relu(q)^T / (its column sums + eps) (keys x queries), o = att^T v; s = [v; 1]^T relu(k).
    """
    i_bh = tl.program_id(0).to(tl.int64)
    o_t, m_t = _tile(0, N, H, D, BN, BD, TOKENS)
    b_q = _relu(tl.load(_head(q_ptr, i_bh, N, H, D, 0, 3, TOKENS) + o_t, mask=m_t, other=0.0))
    b_k = _relu(tl.load(_head(k_ptr, i_bh, N, H, D, 1, 3, TOKENS) + o_t, mask=m_t, other=0.0))
    b_v = tl.load(_head(v_ptr, i_bh, N, H, D, 2, 3, TOKENS) + o_t, mask=m_t, other=0.0)
    # [BN, BD] @ [BD, BN] -> [BN, BN]
    b_att = tl.dot(b_k, tl.trans(b_q), input_precision=PREC)
    b_att = b_att / (tl.sum(b_att, 0) + tl.cast(eps, b_att.dtype))[None, :]
    # [BN, BN] @ [BN, BD] -> [BN, BD]
    b_o = tl.dot(tl.trans(b_att), b_v.to(b_att.dtype), input_precision=PREC)
    tl.store(_head(o_ptr, i_bh, N, H, D, 0, 1, TOKENS) + o_t, b_o.to(o_ptr.dtype.element_ty), mask=m_t)
    # [BD, BN] @ [BN, BD] -> [BD, BD]
    b_a = tl.dot(tl.trans(b_v), b_k, input_precision=PREC)
    _store_state(s_ptr + i_bh * (D + 1) * D, b_a.to(s_ptr.dtype.element_ty),
                 tl.sum(b_k.to(s_ptr.dtype.element_ty), 0), D, BD)


@triton.jit
def relu_linear_attention_quadratic_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, eps, N, H,
    D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, TOKENS: tl.constexpr, PREC: tl.constexpr,
):
    """Gradients of the quadratic form (N <= D), one program per head: q, k, v, do: (N, D) -> dq, dk, dv.

    With c = column sums of S = relu(k) relu(q)^T + eps and att = S / c: datt = v do^T, dv = att do,
    dS = (datt - colsum(datt * att)) / c, dq~ = dS^T k~, dk~ = dS q~.
    """
    i_bh = tl.program_id(0).to(tl.int64)
    o_t, m_t = _tile(0, N, H, D, BN, BD, TOKENS)
    b_q = tl.load(_head(q_ptr, i_bh, N, H, D, 0, 3, TOKENS) + o_t, mask=m_t, other=0.0)
    b_k = tl.load(_head(k_ptr, i_bh, N, H, D, 1, 3, TOKENS) + o_t, mask=m_t, other=0.0)
    b_v = tl.load(_head(v_ptr, i_bh, N, H, D, 2, 3, TOKENS) + o_t, mask=m_t, other=0.0)
    b_do = tl.load(_head(do_ptr, i_bh, N, H, D, 0, 1, TOKENS) + o_t, mask=m_t, other=0.0)
    b_qr, b_kr = _relu(b_q), _relu(b_k)
    # [BN, BD] @ [BD, BN] -> [BN, BN] (keys x queries)
    b_s = tl.dot(b_kr, tl.trans(b_qr), input_precision=PREC)
    acc_ty: tl.constexpr = b_s.dtype
    b_c = tl.sum(b_s, 0) + tl.cast(eps, acc_ty)
    b_att = b_s / b_c[None, :]
    b_datt = tl.dot(b_v.to(acc_ty), tl.trans(b_do.to(acc_ty)), input_precision=PREC)
    b_ds = (b_datt - tl.sum(b_datt * b_att, 0)[None, :]) / b_c[None, :]
    # [BN, BN] @ [BN, BD] -> [BN, BD]
    b_dv = tl.dot(b_att, b_do.to(acc_ty), input_precision=PREC)
    b_dq = tl.where(b_q > 0, tl.dot(tl.trans(b_ds), b_kr.to(acc_ty), input_precision=PREC), 0.0)
    b_dk = tl.where(b_k > 0, tl.dot(b_ds, b_qr.to(acc_ty), input_precision=PREC), 0.0)
    tl.store(_head(dq_ptr, i_bh, N, H, D, 0, 3, TOKENS) + o_t, b_dq.to(dq_ptr.dtype.element_ty), mask=m_t)
    tl.store(_head(dk_ptr, i_bh, N, H, D, 1, 3, TOKENS) + o_t, b_dk.to(dk_ptr.dtype.element_ty), mask=m_t)
    tl.store(_head(dv_ptr, i_bh, N, H, D, 2, 3, TOKENS) + o_t, b_dv.to(dv_ptr.dtype.element_ty), mask=m_t)


def _meta(x: torch.Tensor, n: int, bh: int, d: int, tokens: bool) -> tuple[tuple[int, int], int, dict]:
    """(grid, tokens per program, constexprs): about 4096 programs of whole tiles, one head each."""
    d = int(d)  # a constexpr: static even when torch.compile traces dynamic shapes
    chunk = max(_MIN_CHUNK, triton.next_power_of_2(triton.cdiv(n * bh, 4096)))
    prec = "ieee" if x.dtype == torch.float64 else "tf32"
    return (triton.cdiv(n, chunk), bh), chunk, dict(D=d, BD=max(16, triton.next_power_of_2(d)), TOKENS=tokens,
                                                     PREC=prec)


def _quadratic(n: int, d: int) -> dict | None:
    """Launch options of the quadratic form, used (as by the authors) when N <= head_dim, up to N = 64: its
    N x N tiles stay on chip. Larger N runs the linear form, the same function."""
    if n > min(d, 64):
        return None
    return dict(BN=max(16, triton.next_power_of_2(int(n))), num_warps=8 if d > 32 else 4)


def _forward(q, k, v, o, batch, heads, n, d, eps, tokens) -> torch.Tensor:
    """Write o from contiguous q, k, v; return the state (B, heads, d+1, d) in the accumulation dtype."""
    if o.numel() == 0:
        return q.new_zeros(batch, heads, d + 1, d, dtype=accumulation_dtype(q))
    grid, chunk, meta = _meta(q, n, batch * heads, d, tokens)
    if quadratic := _quadratic(n, d):
        state = new_output(q, (batch * heads, d + 1, d), accumulation_dtype(q))
        wrap_triton(relu_linear_attention_quadratic_fwd_kernel)[(batch * heads,)](
            q, k, v, o, state, eps, n, heads, **quadratic, **meta)
    else:
        partials = new_output(q, (batch * heads, grid[0], d + 1, d), accumulation_dtype(q))
        wrap_triton(relu_linear_attention_fwd_state_kernel)[grid](k, v, partials, n, heads, chunk, **meta)
        state = partials.sum(1)
        wrap_triton(relu_linear_attention_fwd_kernel)[grid](q, state, o, eps, n, heads, chunk, **meta)
    return state.view(batch, heads, d + 1, d)


def _backward(do, q, k, v, state, dq, dk, dv, batch, heads, n, d, eps, tokens) -> None:
    """Write dq, dk, dv from contiguous do, q, k, v and the forward's state."""
    grid, chunk, meta = _meta(q, n, batch * heads, d, tokens)
    if quadratic := _quadratic(n, d):
        wrap_triton(relu_linear_attention_quadratic_bwd_kernel)[(batch * heads,)](
            q, k, v, do, dq, dk, dv, eps, n, heads, **quadratic, **meta)
        return
    partials = new_output(q, (batch * heads, grid[0], d + 1, d), state.dtype)
    wrap_triton(relu_linear_attention_bwd_dq_kernel)[grid](q, do, state, dq, partials, eps, n, heads, chunk,
                                                           **meta)
    dstate = partials.sum(1)
    wrap_triton(relu_linear_attention_bwd_dkv_kernel)[grid](k, v, dstate, dk, dv, n, heads, chunk, **meta)


@triton_op("dcae::relu_linear_attention", mutates_args=())
def _relu_linear_attention_op(qkv: torch.Tensor, head_dim: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv: (B, heads*3*head_dim, H, W) -> (out (B, heads*head_dim, H, W), state (B, heads, head_dim+1, head_dim))."""
    batch, channels, height, width = qkv.shape
    heads = channels // (3 * head_dim)
    qkv = qkv.contiguous()
    out = new_output(qkv, (batch, heads * head_dim, height, width))
    state = _forward(qkv, qkv, qkv, out, batch, heads, height * width, head_dim, eps, tokens=False)
    return out, state


@triton_op("dcae::relu_linear_attention_bwd", mutates_args=())
def _relu_linear_attention_bwd_op(grad_out: torch.Tensor, qkv: torch.Tensor, state: torch.Tensor, head_dim: int,
                                  eps: float) -> torch.Tensor:
    """Gradient of relu_linear_attention's out w.r.t. qkv: (B, heads*3*head_dim, H, W)."""
    batch, channels, height, width = qkv.shape
    if qkv.numel() == 0:
        return torch.zeros_like(qkv)
    qkv = qkv.contiguous()
    grad = new_output(qkv, qkv.shape)
    _backward(grad_out.contiguous(), qkv, qkv, qkv, state, grad, grad, grad, batch, channels // (3 * head_dim),
              height * width, head_dim, eps, tokens=False)
    return grad


@triton_op("dcae::relu_linear_attention_tokens", mutates_args=())
def _relu_linear_attention_tokens_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: (B, N, heads, head_dim) -> (out (B, N, heads, head_dim), state (B, heads, head_dim+1, head_dim))."""
    batch, n, heads, head_dim = q.shape
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = new_output(q, q.shape)
    state = _forward(q, k, v, out, batch, heads, n, head_dim, eps, tokens=True)
    return out, state


@triton_op("dcae::relu_linear_attention_tokens_bwd", mutates_args=())
def _relu_linear_attention_tokens_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                         v: torch.Tensor, state: torch.Tensor,
                                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of relu_linear_attention_tokens's out w.r.t. q, k, v: (B, N, heads, head_dim) each."""
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq, dk, dv = (new_output(q, q.shape) for _ in range(3))
    batch, n, heads, head_dim = q.shape
    _backward(grad_out.contiguous(), q, k, v, state, dq, dk, dv, batch, heads, n, head_dim, eps, tokens=True)
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    qkv, ctx.head_dim, ctx.eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(qkv, output[1])


def _backward_fn(ctx, grad_out, _):
    qkv, state = ctx.saved_tensors
    return torch.ops.dcae.relu_linear_attention_bwd(grad_out, qkv, state, ctx.head_dim, ctx.eps), None, None


def _tokens_setup_context(ctx, inputs, output):
    *qkv, ctx.eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*qkv, output[1])


def _tokens_backward_fn(ctx, grad_out, _):
    return *torch.ops.dcae.relu_linear_attention_tokens_bwd(grad_out, *ctx.saved_tensors, ctx.eps), None


_relu_linear_attention_op.register_autograd(_backward_fn, setup_context=_setup_context)
_relu_linear_attention_tokens_op.register_autograd(_tokens_backward_fn, setup_context=_tokens_setup_context)


def _run_triton(x: torch.Tensor) -> bool:
    """Triton for x, except fp64 on a GPU: cuBLAS does fp64 better, and fp64 states of head_dim 128 overflow
    shared memory. fp64 kernels run under the interpreter (gradcheck)."""
    return use_triton(x) and not (x.is_cuda and x.dtype == torch.float64)


def _check_head_dim(name: str, head_dim: int) -> None:
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{name} must be <= {MAX_HEAD_DIM}, got {head_dim}")


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")


def relu_linear_attention(qkv: torch.Tensor, head_dim: int = 32, eps: float = 1e-15) -> torch.Tensor:
    """EfficientViT LiteMLA's ReLU linear attention on DC-AE's per-head interleaved qkv.

    qkv: (B, heads*3*head_dim, H, W), per head q, k, v blocks of head_dim channels -> (B, heads*head_dim, H, W).
    Per head, N = H*W: out = ([v; 1] relu(k)^T) relu(q), rows :D divided by row D + eps, accumulated in fp32.
    """
    check_float_tensor("qkv", qkv, 4, "(B, heads*3*head_dim, H, W)")
    check_positive_int("head_dim", head_dim)
    _check_head_dim("head_dim", head_dim)
    _check_eps(eps)
    if qkv.shape[1] % (3 * head_dim):
        raise ValueError(f"qkv's channel count must be divisible by 3*head_dim = {3 * head_dim} "
                         f"(heads x [q, k, v] x head_dim), got {qkv.shape[1]}")
    if _run_triton(qkv):
        return torch.ops.dcae.relu_linear_attention(qkv, head_dim, float(eps))[0]
    return reference.relu_linear_attention(qkv, head_dim, eps)


def relu_linear_attention_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention in the token layout (linear diffusion transformers).

    q, k, v: (B, N, heads, head_dim) -> (B, N, heads, head_dim);
    out[n] = sum_m v[m] (relu(k[m]) . relu(q[n])) / (sum_m relu(k[m]) . relu(q[n]) + eps), accumulated in fp32.
    """
    check_float_tensor("q", q, 4, "(B, N, heads, head_dim)")
    check_like("k", k, "q", q, q.shape)
    check_like("v", v, "q", q, q.shape)
    _check_head_dim("q's head_dim (last axis)", q.shape[-1])
    _check_eps(eps)
    if _run_triton(q):
        return torch.ops.dcae.relu_linear_attention_tokens(q, k, v, float(eps))[0]
    return reference.relu_linear_attention_tokens(q, k, v, eps)
