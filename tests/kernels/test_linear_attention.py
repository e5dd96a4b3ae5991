"""relu_linear_attention (DC-AE's interleaved qkv) and relu_linear_attention_tokens against the reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import dcae_kernels as dk
from dcae_kernels import linear_attention, reference
from dcae_kernels.nn import ReLULinearAttention

from .allocations import record_allocations
from .device import CUDA, DEVICE, OPCHECK_UTILS

# Relative to the largest reference magnitude. On a GPU the products with the fp32 state run on tf32 tensor
# cores (fp32 inputs too); the interpreter multiplies in full fp32.
TOL = {torch.float64: 1e-10, torch.float32: 2e-3 if CUDA else 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.fixture
def allocations(monkeypatch):
    """Shapes of the outputs the ops allocate (NaN-poisoned by conftest's fixture)."""
    return record_allocations(monkeypatch, linear_attention)


def make_qkv(batch, heads, head_dim, height, width, dtype, layout="contiguous", device=DEVICE):
    qkv = torch.randn(batch, heads * 3 * head_dim, height, width, device=device)
    if layout == "channels_last":
        qkv = qkv.contiguous(memory_format=torch.channels_last)
    return qkv.to(dtype)


def make_tokens(batch, n, heads, head_dim, dtype, layout="contiguous", device=DEVICE):
    if layout == "contiguous":
        return [torch.randn(batch, n, heads, head_dim, device=device, dtype=dtype) for _ in range(3)]
    # strided views, e.g. q, k, v split off one (B, N, heads, 3*head_dim) projection
    qkv = torch.randn(batch, n, heads, 3 * head_dim, device=device, dtype=dtype)
    return list(qkv.split(head_dim, dim=-1))


def assert_close(actual, expected, dtype, eager=None):
    """actual ~ expected (fp64) within TOL of expected's largest magnitude, plus 4x the error of ``eager``
    (the reference run in ``dtype``): where results cancel to ~0 (e.g. dq at N = 1) only that is meaningful."""
    tol = TOL[dtype]
    atol = tol * expected.abs().max().item() + 1e-30
    if eager is not None:
        atol += 4 * (eager.double() - expected).abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=atol)


def check_against_reference(fn, ref, inputs):
    """Forward and the gradient of every input equal the reference run in fp64 on the same values, as closely
    as the reference run in the inputs' dtype does."""
    dtype = inputs[0].dtype

    def run(f, cast, grad=None):
        xs = [cast(t.detach()).requires_grad_(True) for t in inputs]
        y = f(*xs)
        grad = torch.randn_like(y) if grad is None else grad.to(y.dtype)
        return y, torch.autograd.grad(y, xs, grad), grad

    y, grads, grad = run(fn, lambda t: t)
    y_ref, grads_ref, _ = run(ref, torch.Tensor.double, grad)
    y_eager, grads_eager, _ = run(ref, lambda t: t, grad)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, y_eager)
    for g, g_ref, g_eager in zip(grads, grads_ref, grads_eager):
        assert g.dtype == dtype and g.shape == g_ref.shape
        assert_close(g, g_ref, dtype, g_eager)
    return y, grads


def check_nchw(batch, heads, head_dim, height, width, dtype, layout="contiguous"):
    qkv = make_qkv(batch, heads, head_dim, height, width, dtype, layout)
    return check_against_reference(lambda t: dk.relu_linear_attention(t, head_dim),
                                   lambda t: reference.relu_linear_attention(t, head_dim), [qkv])


def check_tokens(batch, n, heads, head_dim, dtype, layout="contiguous"):
    return check_against_reference(dk.relu_linear_attention_tokens, reference.relu_linear_attention_tokens,
                                   make_tokens(batch, n, heads, head_dim, dtype, layout))


# N = H*W from 1 to 300 (several N-chunks of 64 under the interpreter, partial tiles), N <= head_dim included.
@st.composite
def nchw_cases(draw, dtypes, head_dims):
    return dict(batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 4)),
                head_dim=draw(st.sampled_from(head_dims)), height=draw(st.integers(1, 12)),
                width=draw(st.integers(1, 25)), dtype=draw(st.sampled_from(dtypes)),
                layout=draw(st.sampled_from(["contiguous", "channels_last"])))


@st.composite
def token_cases(draw, dtypes, head_dims, max_n=300):
    return dict(batch=draw(st.integers(1, 2)), n=draw(st.integers(1, max_n)), heads=draw(st.integers(1, 4)),
                head_dim=draw(st.sampled_from(head_dims)), dtype=draw(st.sampled_from(dtypes)),
                layout=draw(st.sampled_from(["contiguous", "strided"])))


@given(case=nchw_cases([torch.float32, torch.float16], [8, 16, 24, 32, 64]))
def test_matches_reference(case):
    check_nchw(**case)


@given(case=token_cases([torch.float32, torch.float16], [8, 16, 24, 32, 64]))
def test_tokens_match_reference(case):
    check_tokens(**case)


@pytest.mark.parametrize("head_dim,n", [(32, 1), (32, 31), (32, 32), (32, 33), (128, 64), (128, 65)])
def test_n_around_head_dim(head_dim, n):
    """N <= head_dim (up to 64): the kernels, like the reference, take the authors' quadratic form."""
    check_nchw(2, 2, head_dim, 1, n, torch.float32)
    check_tokens(1, n, 2, head_dim, torch.float32)


def test_quadratic_form_is_exact_at_one_token():
    """N = 1: out = v and dq = 0 exactly, as in the authors' form (the linear form leaves rounding noise)."""
    qkv = (make_qkv(2, 3, 16, 1, 1, torch.float16).view(2, 3, 3, 16, 1).abs() + 0.1).view(2, 144, 1, 1)
    qkv.requires_grad_(True)
    y = dk.relu_linear_attention(qkv, 16)
    assert torch.equal(y, qkv.detach().view(2, 3, 3, 16, 1, 1)[:, :, 2].reshape(2, 48, 1, 1))
    (grad,) = torch.autograd.grad(y, qkv, torch.randn_like(y))
    assert grad.view(2, 3, 3, 16)[:, :, 0].eq(0).all()


def test_n_in_the_thousands():
    check_nchw(1, 1, 16, 48, 50, torch.float32)
    check_tokens(1, 2500, 1, 16, torch.float32)


@pytest.mark.parametrize("head_dim", [16, 128])
def test_head_dims(head_dim):
    check_nchw(1, 2, head_dim, 5, 13, torch.float32)
    check_tokens(1, 70, 2, head_dim, torch.float32)


def test_reference_forms_agree():
    """The quadratic form (N <= D) and the linear form are one function."""
    q, k, v = torch.randn(3, 2, 32, 20, dtype=torch.float64).unbind(0)
    linear = reference._relu_linear_attention_heads(q.repeat(1, 1, 2), k.repeat(1, 1, 2), v.repeat(1, 1, 2), 1e-15)
    quadratic = reference._relu_linear_attention_heads(q, k, v, 1e-15)
    # duplicating every token doubles numerator and normaliser alike
    torch.testing.assert_close(linear[..., :20], quadratic)


def test_zero_normaliser():
    """Head 0: relu(k) all zero (normaliser = eps, out = 0); head 1: some tokens with relu(q) all zero."""
    qkv = make_qkv(2, 2, 16, 6, 7, torch.float32)
    qkv[:, 16:32] = -qkv[:, 16:32].abs()
    qkv[:, 48:64, :2] = -qkv[:, 48:64, :2].abs()
    y, (grad,) = check_against_reference(lambda t: dk.relu_linear_attention(t, 16),
                                         lambda t: reference.relu_linear_attention(t, 16), [qkv])
    assert y[:, :16].eq(0).all() and y[:, 16:, :2].eq(0).all()
    assert grad.isfinite().all()


def test_every_output_is_written(allocations):
    """The ops allocate through outputs.new_output (NaN under the tests), so unwritten elements show."""
    check_nchw(1, 2, 16, 9, 15, torch.float32)
    check_tokens(2, 200, 3, 32, torch.float32)
    assert (1, 96, 9, 15) in allocations and (2, 200, 3, 32) in allocations


def test_fp16_large_magnitude_stays_finite():
    """fp16 inputs whose fp16 matmuls (efficientvit's half-precision path) overflow: finite, close to fp64."""
    d, heads = 32, 2
    qkv = make_qkv(2, heads, d, 16, 16, torch.float32).view(2, heads, 3, d, 16, 16)
    qkv[:, :, :2] = qkv[:, :, :2].abs() * 300  # q, k
    qkv[:, :, 2] *= 5e3  # v, below the fp16 limit 65504
    qkv = qkv.view(2, heads * 3 * d, 16, 16).half()
    q, k, v = qkv.view(2, heads, 3, d, 256).unbind(2)
    naive = torch.nn.functional.pad(v, (0, 0, 0, 1), value=1.0) @ k.transpose(-1, -2)
    assert naive.isinf().any()
    y = dk.relu_linear_attention(qkv, d)
    assert y.isfinite().all()
    assert_close(y, reference.relu_linear_attention(qkv.double(), d), torch.float16)
    tokens = [t.transpose(1, 3).contiguous() for t in (q, k, v)]  # (B, N, heads, d)
    y = dk.relu_linear_attention_tokens(*tokens)
    assert y.isfinite().all()
    assert_close(y, reference.relu_linear_attention_tokens(*(t.double() for t in tokens)), torch.float16)


@pytest.mark.parametrize("tokens", [False, True])
def test_gradcheck_float64(tokens):
    if tokens:
        inputs, fn = make_tokens(1, 40, 2, 16, torch.float64), dk.relu_linear_attention_tokens
    else:
        inputs, fn = [make_qkv(1, 2, 16, 5, 8, torch.float64)], lambda t: dk.relu_linear_attention(t, 16)
    assert torch.autograd.gradcheck(fn, [t.requires_grad_(True) for t in inputs], fast_mode=True)


def test_deterministic():
    """Partial states are summed in a fixed order: two runs agree bit for bit, forward and backward."""
    qkv = make_qkv(2, 2, 32, 16, 20, torch.float32).requires_grad_(True)
    grad = torch.randn(2, 64, 16, 20, device=DEVICE)
    runs = [(y := dk.relu_linear_attention(qkv), *torch.autograd.grad(y, qkv, grad)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_empty_inputs_launch_nothing(monkeypatch):
    monkeypatch.setattr(linear_attention, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched"))
    for qkv in (make_qkv(0, 2, 16, 4, 4, torch.float32), make_qkv(2, 2, 16, 0, 4, torch.float32),
                make_qkv(2, 0, 16, 4, 4, torch.float32)):
        qkv.requires_grad_(True)
        y = dk.relu_linear_attention(qkv, 16)
        assert y.shape == reference.relu_linear_attention(qkv, 16).shape
        assert torch.autograd.grad(y, qkv, torch.ones_like(y))[0].shape == qkv.shape
    q, k, v = (t.requires_grad_(True) for t in make_tokens(2, 0, 3, 16, torch.float32))
    y = dk.relu_linear_attention_tokens(q, k, v)
    assert y.shape == q.shape and torch.autograd.grad(y, v, torch.ones_like(y))[0].shape == v.shape


# N > head_dim: the chunked linear path (fp32 head_dim 32 shares its GPU compiles with test_other_dtypes_cuda).
def test_opcheck():
    qkv = make_qkv(2, 2, 32, 5, 7, torch.float32).requires_grad_(True)
    opcheck(torch.ops.dcae.relu_linear_attention.default, (qkv, 32, 1e-15), test_utils=OPCHECK_UTILS)
    q, k, v = (t.requires_grad_(True) for t in make_tokens(2, 40, 2, 32, torch.float32))
    opcheck(torch.ops.dcae.relu_linear_attention_tokens.default, (q, k, v, 1e-15), test_utils=OPCHECK_UTILS)


def test_opcheck_backward_ops():
    qkv = make_qkv(2, 2, 32, 5, 7, torch.float32)
    _, state = torch.ops.dcae.relu_linear_attention(qkv, 32, 1e-15)
    grad = torch.randn(2, 64, 5, 7, device=DEVICE)
    opcheck(torch.ops.dcae.relu_linear_attention_bwd.default, (grad, qkv, state, 32, 1e-15),
            test_utils=OPCHECK_UTILS)
    q, k, v = make_tokens(2, 40, 2, 32, torch.float32)
    _, state = torch.ops.dcae.relu_linear_attention_tokens(q, k, v, 1e-15)
    opcheck(torch.ops.dcae.relu_linear_attention_tokens_bwd.default, (torch.randn_like(q), q, k, v, state, 1e-15),
            test_utils=OPCHECK_UTILS)


def test_state_output_is_the_authors_vk():
    """The op's second output is ([v; 1] relu(k)^T) per head, (B, heads, D+1, D), not differentiable."""
    qkv = make_qkv(2, 3, 16, 4, 5, torch.float32).requires_grad_(True)
    out, state = torch.ops.dcae.relu_linear_attention(qkv, 16, 1e-15)
    q, k, v = qkv.detach().double().view(2, 3, 3, 16, 20).unbind(2)
    vk = torch.nn.functional.pad(v, (0, 0, 0, 1), value=1.0) @ k.relu().transpose(-1, -2)
    assert state.dtype == torch.float32
    assert_close(state, vk, torch.float32)
    assert out.requires_grad and not state.requires_grad


def test_module_matches_functional():
    qkv = make_qkv(2, 2, 16, 4, 6, torch.float32)
    module = ReLULinearAttention(head_dim=16)
    torch.testing.assert_close(module(qkv), dk.relu_linear_attention(qkv, 16))
    assert "head_dim=16" in repr(module)
    with pytest.raises(ValueError, match="head_dim must be >= 1"):
        ReLULinearAttention(head_dim=0)


def test_reference_backend(monkeypatch):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    monkeypatch.setattr(linear_attention, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched"))
    qkv = make_qkv(1, 2, 16, 4, 6, torch.float32)
    torch.testing.assert_close(dk.relu_linear_attention(qkv, 16), reference.relu_linear_attention(qkv, 16))
    q, k, v = make_tokens(1, 7, 2, 16, torch.float32)
    torch.testing.assert_close(dk.relu_linear_attention_tokens(q, k, v),
                               reference.relu_linear_attention_tokens(q, k, v))


def test_compiles_without_graph_breaks_on_reference(monkeypatch):
    """The dispatch (backend choice, checks) traces under torch.compile(fullgraph=True)."""
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    def fn(qkv, q):
        return dk.relu_linear_attention(qkv, 16).sum() + dk.relu_linear_attention_tokens(q, q, q).sum()

    qkv, q = torch.randn(1, 96, 4, 4), torch.randn(1, 5, 2, 16)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(qkv, q), fn(qkv, q))


# ----------------------------------------------------------------------------------------- bad input
QKV = torch.randn(2, 96, 4, 4)
Q = torch.randn(2, 16, 2, 16)


class TestBadInput:
    def test_channels_not_divisible(self):
        with pytest.raises(ValueError, match="divisible by 3\\*head_dim = 96"):
            dk.relu_linear_attention(torch.randn(2, 64, 4, 4), 32)

    def test_rank_not_4(self):
        with pytest.raises(ValueError, match=r"qkv must have shape \(B, heads\*3\*head_dim, H, W\)"):
            dk.relu_linear_attention(torch.randn(96, 4, 4), 16)

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="qkv must be float16, bfloat16, float32 or float64"):
            dk.relu_linear_attention(QKV.int(), 16)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
            dk.relu_linear_attention(QKV.numpy(), 16)

    def test_head_dim_zero(self):
        with pytest.raises(ValueError, match="head_dim must be >= 1"):
            dk.relu_linear_attention(QKV, 0)

    def test_head_dim_not_int(self):
        with pytest.raises(TypeError, match="head_dim must be an int"):
            dk.relu_linear_attention(QKV, 16.0)

    def test_head_dim_too_large(self):
        with pytest.raises(ValueError, match="head_dim must be <= 128"):
            dk.relu_linear_attention(torch.randn(1, 3 * 256, 2, 2), 256)

    def test_eps_negative(self):
        with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
            dk.relu_linear_attention(QKV, 16, -1.0)

    def test_eps_not_a_number(self):
        with pytest.raises(TypeError, match="eps must be a float"):
            dk.relu_linear_attention(QKV, 16, None)

    def test_tokens_rank_not_4(self):
        with pytest.raises(ValueError, match=r"q must have shape \(B, N, heads, head_dim\)"):
            dk.relu_linear_attention_tokens(Q[0], Q[0], Q[0])

    def test_tokens_integer_dtype(self):
        with pytest.raises(TypeError, match="q must be float16"):
            dk.relu_linear_attention_tokens(Q.long(), Q.long(), Q.long())

    def test_tokens_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"v must have shape \(2, 16, 2, 16\)"):
            dk.relu_linear_attention_tokens(Q, Q, Q[:, :8])

    def test_tokens_dtype_mismatch(self):
        with pytest.raises(TypeError, match="k must have q's dtype"):
            dk.relu_linear_attention_tokens(Q, Q.double(), Q)

    def test_tokens_mixed_devices(self):
        with pytest.raises(ValueError, match="k is on meta but q is on"):
            dk.relu_linear_attention_tokens(Q, Q.to("meta"), Q)

    def test_tokens_head_dim_too_large(self):
        q = torch.randn(1, 4, 1, 129)
        with pytest.raises(ValueError, match="head_dim \\(last axis\\) must be <= 128"):
            dk.relu_linear_attention_tokens(q, q, q)


# ----------------------------------------------------------------------------------------- sm_90 code
def sm90_spec(kernel, dtype, head_dim, tokens, block=None, num_warps=4, num_stages=3, scalar="fp32"):
    tiles, states = {"fwd_state": (["k_ptr", "v_ptr"], ["s_ptr"]), "fwd": (["q_ptr", "o_ptr"], ["s_ptr"]),
                     "bwd_dq": (["q_ptr", "do_ptr", "dq_ptr"], ["s_ptr", "ds_ptr"]),
                     "bwd_dkv": (["k_ptr", "v_ptr", "dk_ptr", "dv_ptr"], ["ds_ptr"]),
                     "quadratic_fwd": (["q_ptr", "k_ptr", "v_ptr", "o_ptr"], ["s_ptr"]),
                     "quadratic_bwd": (["q_ptr", "k_ptr", "v_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"], [])}[kernel]
    tiling = dict(BN=16) if block is None else dict(BLOCK=block)  # the quadratic kernels take BN (N <= 16 here)
    return dict(module="dcae_kernels.linear_attention", kernel=f"relu_linear_attention_{kernel}_kernel",
                num_warps=num_warps, num_stages=num_stages, aligned=[*tiles, *states, "N"],
                signature={**{p: f"*{dtype}" for p in tiles}, **{p: "*fp32" for p in states}, "eps": scalar,
                           "N": "i32", "H": "i32", "CHUNK": "i32"},
                constexprs=dict(D=head_dim, BD=max(16, head_dim), TOKENS=tokens, PREC="tf32", **tiling))


# Both autotune configs (BLOCK/warps/stages as in linear_attention._CONFIGS) of every linear-form kernel at
# DC-AE's head_dim 32 (both layouts) and DiT's 64 (tokens), and the quadratic form, in bf16.
SM90 = {f"{k} D{d} {'tokens' if t else 'nchw'} {b}/{w}": sm90_spec(k, "bf16", d, t, b, w, s)
        for k in ("fwd_state", "fwd", "bwd_dq", "bwd_dkv") for d, t in ((32, False), (32, True), (64, True))
        for b, w, s in ((2048, 4, 3), (4096, 8, 2))}
SM90.update({f"{k} D{d} {'tokens' if t else 'nchw'}": sm90_spec(k, "bf16", d, t)
             for k in ("quadratic_fwd", "quadratic_bwd") for d, t in ((32, False), (64, True))})
# torch.compile (Inductor) passes Python floats such as eps to Triton kernels as fp64 scalars.
SM90.update({f"{k} D32 nchw, fp64 eps (Inductor)": sm90_spec(k, "bf16", 32, False, *cfg, scalar="fp64")
             for k, cfg in (("fwd", (2048, 4, 3)), ("bwd_dq", (2048, 4, 3)), ("quadratic_fwd", ()),
                            ("quadratic_bwd", ()))})


@pytest.mark.parametrize("name", list(SM90))
def test_sm90_compiles_without_spills(sm90, name):
    assert "error" not in sm90[name] and sm90[name]["stack"] == 0, sm90[name]


# ----------------------------------------------------------------------------------------- GPU only
# Each (dtype, head_dim, layout) autotunes and compiles its kernels on first use: the GPU tests keep to few.
@pytest.mark.gpu
@settings(max_examples=6)
@given(case=nchw_cases([torch.bfloat16], [16, 32, 64, 128]))
def test_matches_reference_cuda_bf16(case):
    check_nchw(**case)


@pytest.mark.gpu
@settings(max_examples=6)
@given(case=token_cases([torch.bfloat16], [16, 32, 64, 128], max_n=3000))
def test_tokens_match_reference_cuda_bf16(case):
    check_tokens(**case)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_head_dims_cuda_bf16(head_dim):
    """Every head_dim the issue names, both layouts, linear (N = 1147) and quadratic (N = 12) forms."""
    check_nchw(2, 3, head_dim, 31, 37, torch.bfloat16)
    check_nchw(2, 3, head_dim, 3, 4, torch.bfloat16)
    check_tokens(2, 1147, 3, head_dim, torch.bfloat16, "strided")
    check_tokens(2, 12, 3, head_dim, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_dtypes_cuda(dtype):
    check_nchw(2, 3, 32, 40, 37, dtype)
    check_tokens(2, 1500, 3, 32, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 32, 128, 128), (2, 32, 256, 256)])
def test_dcae_shapes_bf16(shape):
    """anchors-gpu.md's shapes (B, heads, H, W), head_dim 32, against the fp32 (diffusers) reference."""
    batch, heads, height, width = shape
    qkv = make_qkv(batch, heads, 32, height, width, torch.bfloat16).requires_grad_(True)
    y = dk.relu_linear_attention(qkv, 32)
    q32 = qkv.detach().float().requires_grad_(True)
    y_ref = reference.relu_linear_attention(q32, 32)
    assert_close(y, y_ref.double(), torch.bfloat16)
    grad = torch.randn_like(y)
    (g,), (g_ref,) = torch.autograd.grad(y, qkv, grad), torch.autograd.grad(y_ref, q32, grad.float())
    assert_close(g, g_ref.double(), torch.bfloat16)


@pytest.mark.gpu
def test_deterministic_cuda_large():
    qkv = make_qkv(2, 8, 32, 128, 128, torch.bfloat16).requires_grad_(True)
    grad = torch.randn(2, 256, 128, 128, device="cuda", dtype=torch.bfloat16)
    runs = [(y := dk.relu_linear_attention(qkv), *torch.autograd.grad(y, qkv, grad)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.gpu
def test_more_than_2_pow_31_elements():
    """int64 offsets: a 2.2e9-element qkv (4.4 GB bf16); the last batch element (past 2**31) vs the reference."""
    qkv = make_qkv(11, 32, 32, 256, 256, torch.bfloat16).requires_grad_(True)
    assert qkv.numel() > 2**31
    y = dk.relu_linear_attention(qkv, 32)
    grad = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, qkv, grad)
    last = qkv[-1:].detach().float().requires_grad_(True)
    y_ref = reference.relu_linear_attention(last, 32)
    assert_close(y[-1:], y_ref.double(), torch.bfloat16)
    assert_close(g[-1:], torch.autograd.grad(y_ref, last, grad[-1:].float())[0].double(), torch.bfloat16)


@pytest.mark.gpu
def test_torch_compile_fullgraph_fwd_bwd():
    def block(qkv, q, k, v):
        return (dk.relu_linear_attention(qkv * 2, 32).sum() + dk.relu_linear_attention(qkv[..., :4, :4], 32).sum()
                + (dk.relu_linear_attention_tokens(q, k, v) ** 2).sum())

    qkv = make_qkv(2, 4, 32, 24, 24, torch.bfloat16).requires_grad_(True)
    tokens = [t.requires_grad_(True) for t in make_tokens(2, 300, 4, 64, torch.bfloat16)]
    compiled = torch.compile(block, fullgraph=True)
    y, y_eager = compiled(qkv, *tokens), block(qkv, *tokens)
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(torch.autograd.grad(y, (qkv, *tokens)), torch.autograd.grad(y_eager, (qkv, *tokens))):
        torch.testing.assert_close(a, b)


def test_reference_state_of_regions_adds_up():
    """The split form tiled inference uses: states of disjoint regions sum to the whole image's state, and
    applying it to any region gives that region of the whole attention (both the linear and quadratic paths)."""
    torch.manual_seed(0)
    for height in (4, 12):  # N = 16 <= D (quadratic path) and N = 48 > D (linear path)
        qkv = torch.randn(2, 2 * 3 * 16, height, 4, dtype=torch.float64)
        whole = reference.relu_linear_attention(qkv, 16)
        top, bottom = qkv[..., : height // 2, :], qkv[..., height // 2:, :]
        state = reference.relu_linear_attention_state(top, 16) + reference.relu_linear_attention_state(bottom, 16)
        assert state.shape == (2, 2, 17, 16)
        torch.testing.assert_close(reference.relu_linear_attention_state(qkv, 16), state)
        torch.testing.assert_close(reference.relu_linear_attention_apply(bottom, state, 16),
                                   whole[..., height // 2:, :])
