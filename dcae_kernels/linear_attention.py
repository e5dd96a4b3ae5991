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

The two halves are public ops too, for callers that sum the state over regions (tiled inference):
``relu_linear_attention_state`` (the state kernel + torch's sum of partials; backward: the dkv kernel given dS)
and ``relu_linear_attention_apply`` (the apply kernel, with a state of any region; backward: the dq kernel, which
also gives dS), in both layouts. They always take the linear form. relu is torch's: NaN stays NaN, and its
gradient passes through at NaN inputs (0 only where x <= 0). Second derivatives run the reference.

Every sum accumulates in fp32 (fp64 for fp64 inputs), so large fp16 inputs cannot overflow. ``eps`` enters the
kernels as ``tl.full([], eps, acc)``: exact for fp64 under the interpreter (``tl.cast`` of a Python float rounds it
to fp32 first), converted once where torch.compile passes Python floats as fp64 scalars. Products of two
fp16/bf16 tiles are exact; products with fp32 operands (the state, fp32 inputs) run on tf32 tensor cores:
10-bit mantissas, ~5e-4 relative, at or below the fp16/bf16 output rounding. fp64 inputs use IEEE fp64.
"""
import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import reference
from .backend import INTERPRET, reference_double_backward, run_triton
from .checks import check_eps, check_float_tensor, check_like, check_positive_int
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
    """torch.relu in x's own dtype: NaN stays NaN (tl.maximum's default and ``where(x > 0, x, 0)`` turn it into 0).
    fp16 / bf16 (tl.dot operands) through a select, since Triton 3.6's tl.maximum turns bf16 into fp32; fp32 /
    fp64 through one NaN-propagating max (the select costs the dq kernel a spill on sm_90)."""
    if x.dtype.is_fp16() or x.dtype.is_bf16():
        return tl.where(x < 0, tl.zeros_like(x), x)
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _relu_grad(x, g):
    """relu's backward as torch computes it: 0 where x <= 0, else g (NaN inputs pass g through, as in torch)."""
    return tl.where(x <= 0, 0.0, g)


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
        b_q = _relu(tl.load(p_q + o_t, mask=m_t, other=0.0).to(acc_ty))
        # [BN, BD] @ [BD, BD] -> [BN, BD]
        b_num = tl.dot(b_q, b_at, input_precision=PREC)
        b_den = tl.sum(b_q * b_z[None, :], 1) + tl.full([], eps, acc_ty)
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
        b_qr = _relu(b_q.to(acc_ty))
        b_do = tl.load(p_do + o_t, mask=m_t, other=0.0).to(acc_ty)
        b_den = tl.sum(b_qr * b_z[None, :], 1) + tl.full([], eps, acc_ty)
        # g = A^T do: [BN, BD] @ [BD, BD] -> [BN, BD]
        b_g = tl.dot(b_do, b_a, input_precision=PREC)
        b_dden = -tl.sum(b_qr * b_g, 1) / (b_den * b_den)
        b_dq = _relu_grad(b_q, b_g / b_den[:, None] + b_dden[:, None] * b_z[None, :])
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
        b_dk = _relu_grad(b_k, tl.dot(b_v, b_da, input_precision=PREC) + b_dz[None, :])
        b_dv = tl.dot(_relu(b_k.to(acc_ty)), b_dat, input_precision=PREC)
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
    b_att = b_att / (tl.sum(b_att, 0) + tl.full([], eps, b_att.dtype))[None, :]
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
    b_c = tl.sum(b_s, 0) + tl.full([], eps, acc_ty)
    b_att = b_s / b_c[None, :]
    b_datt = tl.dot(b_v.to(acc_ty), tl.trans(b_do.to(acc_ty)), input_precision=PREC)
    b_ds = (b_datt - tl.sum(b_datt * b_att, 0)[None, :]) / b_c[None, :]
    # [BN, BN] @ [BN, BD] -> [BN, BD]
    b_dv = tl.dot(b_att, b_do.to(acc_ty), input_precision=PREC)
    b_dq = _relu_grad(b_q, tl.dot(tl.trans(b_ds), b_kr.to(acc_ty), input_precision=PREC))
    b_dk = _relu_grad(b_k, tl.dot(b_ds, b_qr.to(acc_ty), input_precision=PREC))
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


def _sum_state(k, v, batch, heads, n, d, tokens) -> torch.Tensor:
    """[v; 1]^T relu(k) of contiguous k, v per head (linear form) -> (B*heads, d+1, d) in the accumulation dtype."""
    if batch * heads * n == 0:
        return k.new_zeros(batch * heads, d + 1, d, dtype=accumulation_dtype(k))
    grid, chunk, meta = _meta(k, n, batch * heads, d, tokens)
    partials = new_output(k, (batch * heads, grid[0], d + 1, d), accumulation_dtype(k))
    wrap_triton(relu_linear_attention_fwd_state_kernel)[grid](k, v, partials, n, heads, chunk, **meta)
    return partials.sum(1)


def _apply_state(q, state, o, batch, heads, n, d, eps, tokens) -> None:
    """Write o = A relu(q) / (z . relu(q) + eps) from contiguous q and state (B*heads, d+1, d)."""
    grid, chunk, meta = _meta(q, n, batch * heads, d, tokens)
    wrap_triton(relu_linear_attention_fwd_kernel)[grid](q, state, o, eps, n, heads, chunk, **meta)


def _grad_q_state(do, q, state, dq, batch, heads, n, d, eps, tokens) -> torch.Tensor:
    """Write dq from contiguous do, q and the state; return the state's gradient (B*heads, d+1, d)."""
    grid, chunk, meta = _meta(q, n, batch * heads, d, tokens)
    partials = new_output(q, (batch * heads, grid[0], d + 1, d), state.dtype)
    wrap_triton(relu_linear_attention_bwd_dq_kernel)[grid](q, do, state, dq, partials, eps, n, heads, chunk,
                                                           **meta)
    return partials.sum(1)


def _grad_kv(k, v, dstate, dk, dv, batch, heads, n, d, tokens) -> None:
    """Write dk, dv from contiguous k, v and the state's gradient dstate (B*heads, d+1, d)."""
    grid, chunk, meta = _meta(k, n, batch * heads, d, tokens)
    wrap_triton(relu_linear_attention_bwd_dkv_kernel)[grid](k, v, dstate, dk, dv, n, heads, chunk, **meta)


def _forward(q, k, v, o, batch, heads, n, d, eps, tokens) -> torch.Tensor:
    """Write o from contiguous q, k, v; return the state (B, heads, d+1, d) in the accumulation dtype."""
    if o.numel() == 0:
        return q.new_zeros(batch, heads, d + 1, d, dtype=accumulation_dtype(q))
    if quadratic := _quadratic(n, d):
        _, _, meta = _meta(q, n, batch * heads, d, tokens)
        state = new_output(q, (batch * heads, d + 1, d), accumulation_dtype(q))
        wrap_triton(relu_linear_attention_quadratic_fwd_kernel)[(batch * heads,)](
            q, k, v, o, state, eps, n, heads, **quadratic, **meta)
    else:
        state = _sum_state(k, v, batch, heads, n, d, tokens)
        _apply_state(q, state, o, batch, heads, n, d, eps, tokens)
    return state.view(batch, heads, d + 1, d)


def _backward(do, q, k, v, state, dq, dk, dv, batch, heads, n, d, eps, tokens) -> None:
    """Write dq, dk, dv from contiguous do, q, k, v and the forward's state."""
    if quadratic := _quadratic(n, d):
        _, _, meta = _meta(q, n, batch * heads, d, tokens)
        wrap_triton(relu_linear_attention_quadratic_bwd_kernel)[(batch * heads,)](
            q, k, v, do, dq, dk, dv, eps, n, heads, **quadratic, **meta)
        return
    dstate = _grad_q_state(do, q, state, dq, batch, heads, n, d, eps, tokens)
    _grad_kv(k, v, dstate, dk, dv, batch, heads, n, d, tokens)


def _zero_parts(grad: torch.Tensor, heads: int, parts: tuple[int, ...]) -> torch.Tensor:
    """Zero the given parts (0 = q, 1 = k, 2 = v) of every head of an interleaved (B, heads*3*D, H, W) gradient."""
    view = grad.view(grad.shape[0], heads, 3, -1)
    for part in parts:
        view[:, :, part].zero_()
    return grad


# ----------------------------------------------------------------------------------------- registered ops
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


@triton_op("dcae::relu_linear_attention_state", mutates_args=())
def _state_op(qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """qkv: (B, heads*3*head_dim, H, W) -> state (B, heads, head_dim+1, head_dim) in the accumulation dtype."""
    batch, channels, height, width = qkv.shape
    heads = channels // (3 * head_dim)
    qkv = qkv.contiguous()
    return _sum_state(qkv, qkv, batch, heads, height * width, head_dim, False).view(batch, heads, head_dim + 1,
                                                                                   head_dim)


@triton_op("dcae::relu_linear_attention_state_bwd", mutates_args=())
def _state_bwd_op(grad_state: torch.Tensor, qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Gradient of relu_linear_attention_state w.r.t. qkv (B, heads*3*head_dim, H, W): zero in the q blocks."""
    batch, channels, height, width = qkv.shape
    heads = channels // (3 * head_dim)
    if qkv.numel() == 0:
        return torch.zeros_like(qkv)
    qkv = qkv.contiguous()
    grad = _zero_parts(new_output(qkv, qkv.shape), heads, (0,))
    _grad_kv(qkv, qkv, grad_state.contiguous(), grad, grad, batch, heads, height * width, head_dim, False)
    return grad


@triton_op("dcae::relu_linear_attention_apply", mutates_args=())
def _apply_op(qkv: torch.Tensor, state: torch.Tensor, head_dim: int, eps: float) -> torch.Tensor:
    """qkv: (B, heads*3*head_dim, H, W), state: (B, heads, head_dim+1, head_dim) -> (B, heads*head_dim, H, W)."""
    batch, channels, height, width = qkv.shape
    heads = channels // (3 * head_dim)
    qkv = qkv.contiguous()
    out = new_output(qkv, (batch, heads * head_dim, height, width))
    if out.numel():
        _apply_state(qkv, state.contiguous(), out, batch, heads, height * width, head_dim, eps, False)
    return out


@triton_op("dcae::relu_linear_attention_apply_bwd", mutates_args=())
def _apply_bwd_op(grad_out: torch.Tensor, qkv: torch.Tensor, state: torch.Tensor, head_dim: int,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of relu_linear_attention_apply w.r.t. qkv (zero in the k and v blocks) and the state."""
    batch, channels, height, width = qkv.shape
    heads = channels // (3 * head_dim)
    if qkv.numel() == 0:
        return torch.zeros_like(qkv), torch.zeros_like(state)
    qkv = qkv.contiguous()
    grad = _zero_parts(new_output(qkv, qkv.shape), heads, (1, 2))
    dstate = _grad_q_state(grad_out.contiguous(), qkv, state.contiguous(), grad, batch, heads, height * width,
                           head_dim, eps, False)
    return grad, dstate.view(state.shape)


@triton_op("dcae::relu_linear_attention_tokens_state", mutates_args=())
def _tokens_state_op(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """k, v: (B, N, heads, head_dim) -> state (B, heads, head_dim+1, head_dim) in the accumulation dtype."""
    batch, n, heads, head_dim = k.shape
    state = _sum_state(k.contiguous(), v.contiguous(), batch, heads, n, head_dim, True)
    return state.view(batch, heads, head_dim + 1, head_dim)


@triton_op("dcae::relu_linear_attention_tokens_state_bwd", mutates_args=())
def _tokens_state_bwd_op(grad_state: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of relu_linear_attention_tokens_state w.r.t. k and v: (B, N, heads, head_dim) each."""
    if k.numel() == 0:
        return torch.zeros_like(k), torch.zeros_like(v)
    k, v = k.contiguous(), v.contiguous()
    dk, dv = new_output(k, k.shape), new_output(v, v.shape)
    batch, n, heads, head_dim = k.shape
    _grad_kv(k, v, grad_state.contiguous(), dk, dv, batch, heads, n, head_dim, True)
    return dk, dv


@triton_op("dcae::relu_linear_attention_tokens_apply", mutates_args=())
def _tokens_apply_op(q: torch.Tensor, state: torch.Tensor, eps: float) -> torch.Tensor:
    """q: (B, N, heads, head_dim), state: (B, heads, head_dim+1, head_dim) -> (B, N, heads, head_dim)."""
    batch, n, heads, head_dim = q.shape
    q = q.contiguous()
    out = new_output(q, q.shape)
    if out.numel():
        _apply_state(q, state.contiguous(), out, batch, heads, n, head_dim, eps, True)
    return out


@triton_op("dcae::relu_linear_attention_tokens_apply_bwd", mutates_args=())
def _tokens_apply_bwd_op(grad_out: torch.Tensor, q: torch.Tensor, state: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of relu_linear_attention_tokens_apply w.r.t. q (B, N, heads, head_dim) and the state."""
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(state)
    q = q.contiguous()
    dq = new_output(q, q.shape)
    batch, n, heads, head_dim = q.shape
    dstate = _grad_q_state(grad_out.contiguous(), q, state.contiguous(), dq, batch, heads, n, head_dim, eps, True)
    return dq, dstate.view(state.shape)


# ----------------------------------------------------------------------------------------- autograd
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


def _save_inputs(ctx, inputs, output):
    """Save the tensor inputs, keep the others (head_dim, eps) as ``ctx.args``."""
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))
    ctx.args = [a for a in inputs if not isinstance(a, torch.Tensor)]


def _state_backward_fn(ctx, grad_state):
    return torch.ops.dcae.relu_linear_attention_state_bwd(grad_state, *ctx.saved_tensors, *ctx.args), None


def _apply_backward_fn(ctx, grad_out):
    return *torch.ops.dcae.relu_linear_attention_apply_bwd(grad_out, *ctx.saved_tensors, *ctx.args), None, None


def _tokens_state_backward_fn(ctx, grad_state):
    return torch.ops.dcae.relu_linear_attention_tokens_state_bwd(grad_state, *ctx.saved_tensors)


def _tokens_apply_backward_fn(ctx, grad_out):
    return *torch.ops.dcae.relu_linear_attention_tokens_apply_bwd(grad_out, *ctx.saved_tensors, *ctx.args), None


_relu_linear_attention_op.register_autograd(_backward_fn, setup_context=_setup_context)
_relu_linear_attention_tokens_op.register_autograd(_tokens_backward_fn, setup_context=_tokens_setup_context)
_state_op.register_autograd(_state_backward_fn, setup_context=_save_inputs)
_apply_op.register_autograd(_apply_backward_fn, setup_context=_save_inputs)
_tokens_state_op.register_autograd(_tokens_state_backward_fn, setup_context=_save_inputs)
_tokens_apply_op.register_autograd(_tokens_apply_backward_fn, setup_context=_save_inputs)


def _register_double_backward(bwd_op, forward, n_primals: int) -> None:
    """Second derivatives through the reference: ``bwd_op(grad, *primals, *args)`` is the gradient of
    ``forward(*primals, *args)`` w.r.t. its first ``n_primals`` inputs (see `reference_double_backward`)."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:1 + n_primals])
        ctx.args = inputs[1 + n_primals:]

    def backward(ctx, *grad_grads):
        grad, *primals = ctx.saved_tensors
        grads = reference_double_backward(lambda *p: forward(*p, *ctx.args), grad, primals, grad_grads)
        return *grads, *(None for _ in ctx.args)

    bwd_op.register_autograd(backward, setup_context=setup_context)


_register_double_backward(_relu_linear_attention_bwd_op,
                          lambda qkv, _, head_dim, eps: reference.relu_linear_attention(qkv, head_dim, eps), 1)
_register_double_backward(_relu_linear_attention_tokens_bwd_op,
                          lambda q, k, v, _, eps: reference.relu_linear_attention_tokens(q, k, v, eps), 3)
_register_double_backward(_state_bwd_op, reference.relu_linear_attention_state, 1)
_register_double_backward(_apply_bwd_op, reference.relu_linear_attention_apply, 2)
_register_double_backward(_tokens_state_bwd_op, reference.relu_linear_attention_tokens_state, 2)
_register_double_backward(_tokens_apply_bwd_op, reference.relu_linear_attention_tokens_apply, 2)


# ----------------------------------------------------------------------------------------- public API
def _check_qkv(qkv: torch.Tensor, head_dim: int) -> None:
    check_float_tensor("qkv", qkv, 4, "(B, heads*3*head_dim, H, W)")
    check_positive_int("head_dim", head_dim, MAX_HEAD_DIM)
    if qkv.shape[1] % (3 * head_dim):
        raise ValueError(f"qkv's channel count must be divisible by 3*head_dim = {3 * head_dim} "
                         f"(heads x [q, k, v] x head_dim), got {qkv.shape[1]}")


def _check_tokens(name: str, t: torch.Tensor, ref_name: str | None = None, ref: torch.Tensor | None = None) -> None:
    """``t`` is (B, N, heads, head_dim) with 1 <= head_dim <= MAX_HEAD_DIM (and ``ref``'s shape, dtype, device)."""
    if ref is not None:
        check_like(name, t, ref_name, ref, ref.shape)
        return
    check_float_tensor(name, t, 4, "(B, N, heads, head_dim)")
    check_positive_int(f"{name}'s head_dim (last axis)", t.shape[-1], MAX_HEAD_DIM)


def _check_state(state: torch.Tensor, name: str, x: torch.Tensor, batch: int, heads: int, head_dim: int) -> None:
    """``state`` is a (B, heads, head_dim+1, head_dim) state in the accumulation dtype of ``x`` (named ``name``)."""
    shape = (batch, heads, head_dim + 1, head_dim)
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a torch.Tensor (B, heads, head_dim+1, head_dim), got {type(state).__name__}")
    if state.device != x.device:
        raise ValueError(f"state is on {state.device} but {name} is on {x.device}: put both on one device")
    if state.dtype != accumulation_dtype(x):
        raise TypeError(f"state must be {accumulation_dtype(x)} (the accumulation dtype for {name}'s {x.dtype}, "
                        f"as the state ops return it), got {state.dtype}")
    if tuple(state.shape) != shape:
        raise ValueError(f"state must have shape (B, heads, head_dim+1, head_dim) = {shape}, got "
                         f"{tuple(state.shape)}")


def relu_linear_attention(qkv: torch.Tensor, head_dim: int = 32, eps: float = 1e-15) -> torch.Tensor:
    """EfficientViT LiteMLA's ReLU linear attention on DC-AE's per-head interleaved qkv.

    qkv: (B, heads*3*head_dim, H, W), per head q, k, v blocks of head_dim channels -> (B, heads*head_dim, H, W).
    Per head, N = H*W: out = ([v; 1] relu(k)^T) relu(q), rows :D divided by row D + eps, accumulated in fp32;
    the authors' quadratic form for N <= head_dim. Equals
    ``relu_linear_attention_apply(qkv, relu_linear_attention_state(qkv, head_dim), head_dim, eps)``.
    """
    _check_qkv(qkv, head_dim)
    check_eps(eps)
    if run_triton(qkv):
        return torch.ops.dcae.relu_linear_attention(qkv, head_dim, float(eps))[0]
    return reference.relu_linear_attention(qkv, head_dim, eps)


def relu_linear_attention_state(qkv: torch.Tensor, head_dim: int = 32) -> torch.Tensor:
    """The keys' and values' half of `relu_linear_attention`: its sum over all positions, per head.

    qkv: (B, heads*3*head_dim, H, W) -> state [v; 1] relu(k)^T (B, heads, head_dim+1, head_dim) in the accumulation
    dtype (fp32; fp64 for fp64), differentiable w.r.t. qkv's k and v blocks. States of disjoint regions add up to
    the state of their union, so a tiled image sums its tiles' states.
    """
    _check_qkv(qkv, head_dim)
    if run_triton(qkv):
        return torch.ops.dcae.relu_linear_attention_state(qkv, head_dim)
    return reference.relu_linear_attention_state(qkv, head_dim)


def relu_linear_attention_apply(qkv: torch.Tensor, state: torch.Tensor, head_dim: int = 32,
                                eps: float = 1e-15) -> torch.Tensor:
    """The queries' half of `relu_linear_attention`: qkv's queries attend to the keys summed into ``state``.

    qkv: (B, heads*3*head_dim, H, W) (only its q blocks are read), state: (B, heads, head_dim+1, head_dim) from
    `relu_linear_attention_state`, of qkv or of any region (e.g. the whole image qkv is a tile of) ->
    (B, heads*head_dim, H, W); out = A relu(q) / (z . relu(q) + eps) with state = [A; z]. Always the linear
    form (the fused op takes the authors' quadratic form for N <= head_dim: the same function, other rounding).
    Differentiable w.r.t. qkv and state.
    """
    _check_qkv(qkv, head_dim)
    _check_state(state, "qkv", qkv, qkv.shape[0], qkv.shape[1] // (3 * head_dim), head_dim)
    check_eps(eps)
    if run_triton(qkv):
        return torch.ops.dcae.relu_linear_attention_apply(qkv, state, head_dim, float(eps))
    return reference.relu_linear_attention_apply(qkv, state, head_dim, eps)


def relu_linear_attention_tokens(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 eps: float = 1e-15) -> torch.Tensor:
    """ReLU linear attention in the token layout (linear diffusion transformers).

    q, k, v: (B, N, heads, head_dim) -> (B, N, heads, head_dim);
    out[n] = sum_m v[m] (relu(k[m]) . relu(q[n])) / (sum_m relu(k[m]) . relu(q[n]) + eps), accumulated in fp32.
    """
    _check_tokens("q", q)
    _check_tokens("k", k, "q", q)
    _check_tokens("v", v, "q", q)
    check_eps(eps)
    if run_triton(q):
        return torch.ops.dcae.relu_linear_attention_tokens(q, k, v, float(eps))[0]
    return reference.relu_linear_attention_tokens(q, k, v, eps)


def relu_linear_attention_tokens_state(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`relu_linear_attention_state` in the token layout: k, v: (B, N, heads, head_dim) -> state [v; 1] relu(k)^T
    (B, heads, head_dim+1, head_dim) in the accumulation dtype, summed over the N tokens."""
    _check_tokens("k", k)
    _check_tokens("v", v, "k", k)
    if run_triton(k):
        return torch.ops.dcae.relu_linear_attention_tokens_state(k, v)
    return reference.relu_linear_attention_tokens_state(k, v)


def relu_linear_attention_tokens_apply(q: torch.Tensor, state: torch.Tensor, eps: float = 1e-15) -> torch.Tensor:
    """`relu_linear_attention_apply` in the token layout: q: (B, N, heads, head_dim), state (B, heads, head_dim+1,
    head_dim) from `relu_linear_attention_tokens_state` of any tokens -> (B, N, heads, head_dim). Linear form."""
    _check_tokens("q", q)
    _check_state(state, "q", q, q.shape[0], q.shape[2], q.shape[3])
    check_eps(eps)
    if run_triton(q):
        return torch.ops.dcae.relu_linear_attention_tokens_apply(q, state, float(eps))
    return reference.relu_linear_attention_tokens_apply(q, state, eps)
