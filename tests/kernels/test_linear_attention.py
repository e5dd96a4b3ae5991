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
from .nonfinite import SPECIALS, check_nonfinite_like_reference, plant

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
    as the reference run in the inputs' dtype does; each result in the dtype the reference gives it."""
    dtype = inputs[0].dtype

    def run(f, cast, grad=None):
        xs = [cast(t.detach()).requires_grad_(True) for t in inputs]
        y = f(*xs)
        grad = torch.randn_like(y) if grad is None else grad.to(y.dtype)
        return y, torch.autograd.grad(y, xs, grad), grad

    y, grads, grad = run(fn, lambda t: t)
    y_ref, grads_ref, _ = run(ref, torch.Tensor.double, grad)
    y_eager, grads_eager, _ = run(ref, lambda t: t, grad)
    assert y.dtype == y_eager.dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, y_eager)
    for t, g, g_ref, g_eager in zip(inputs, grads, grads_ref, grads_eager):
        assert g.dtype == t.dtype and g.shape == g_ref.shape
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
def nchw_cases(draw, dtypes, head_dims, max_height=12, max_width=25, min_width=1):
    return dict(batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 4)),
                head_dim=draw(st.sampled_from(head_dims)), height=draw(st.integers(1, max_height)),
                width=draw(st.integers(min_width, max_width)), dtype=draw(st.sampled_from(dtypes)),
                layout=draw(st.sampled_from(["contiguous", "channels_last"])))


@st.composite
def token_cases(draw, dtypes, head_dims, max_n=300, min_n=1):
    return dict(batch=draw(st.integers(1, 2)), n=draw(st.integers(min_n, max_n)), heads=draw(st.integers(1, 4)),
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


# ----------------------------------------------------------------------------------------- state and apply
def state_apply_nchw(head_dim, rows):
    """(ours, reference): apply to the top ``rows`` rows of qkv with the state of the whole of it."""
    def make(state_fn, apply_fn):
        return lambda qkv: apply_fn(qkv[..., :rows, :], state_fn(qkv, head_dim), head_dim)
    return (make(dk.relu_linear_attention_state, dk.relu_linear_attention_apply),
            make(reference.relu_linear_attention_state, reference.relu_linear_attention_apply))


def state_apply_tokens(tokens):
    """(ours, reference): apply the first ``tokens`` queries to the state of all the keys."""
    def make(state_fn, apply_fn):
        return lambda q, k, v: apply_fn(q[:, :tokens], state_fn(k, v))
    return (make(dk.relu_linear_attention_tokens_state, dk.relu_linear_attention_tokens_apply),
            make(reference.relu_linear_attention_tokens_state, reference.relu_linear_attention_tokens_apply))


# N >= 2: with the keys of one position, out = v whatever q, and dq = 0 is rounding noise, which the linear
# form (here at every N) leaves larger than the reference does (see test_quadratic_form_is_exact_at_one_token).
@settings(max_examples=5)
@given(case=nchw_cases([torch.float32, torch.float16], [8, 16, 32], max_height=6, max_width=14, min_width=2),
       seed=st.integers(0, 2**16))
def test_state_and_apply_match_reference(case, seed):
    """The state alone; apply to a region with the whole's state, gradients through both; apply alone, with the
    state's gradient. Any N (the state ops have no quadratic form)."""
    torch.manual_seed(seed)
    head_dim, rows = case["head_dim"], (case["height"] + 1) // 2
    qkv = make_qkv(**case)
    check_against_reference(lambda t: dk.relu_linear_attention_state(t, head_dim),
                            lambda t: reference.relu_linear_attention_state(t, head_dim), [qkv])
    check_against_reference(*state_apply_nchw(head_dim, rows), [qkv])
    state = reference.relu_linear_attention_state(make_qkv(**case), head_dim)
    check_against_reference(lambda t, s: dk.relu_linear_attention_apply(t, s, head_dim),
                            lambda t, s: reference.relu_linear_attention_apply(t, s, head_dim), [qkv, state])


@settings(max_examples=5)
@given(case=token_cases([torch.float32, torch.float16], [8, 16, 24, 32], max_n=80, min_n=2),
       seed=st.integers(0, 2**16))
def test_tokens_state_and_apply_match_reference(case, seed):
    torch.manual_seed(seed)
    q, k, v = make_tokens(**case)
    check_against_reference(dk.relu_linear_attention_tokens_state, reference.relu_linear_attention_tokens_state,
                            [k, v])
    check_against_reference(*state_apply_tokens((case["n"] + 1) // 2), [q, k, v])
    state = reference.relu_linear_attention_tokens_state(*make_tokens(**case)[1:])
    check_against_reference(dk.relu_linear_attention_tokens_apply, reference.relu_linear_attention_tokens_apply,
                            [q, state])


@pytest.mark.parametrize("n", [12, 40])  # the fused op's quadratic (N <= head_dim) and linear forms
@pytest.mark.parametrize("tokens", [False, True])
def test_fused_op_is_state_then_apply(n, tokens):
    """relu_linear_attention == apply(state): values and gradients; bit for bit where both take the linear form."""
    if tokens:
        inputs = [t.requires_grad_(True) for t in make_tokens(2, n, 2, 16, torch.float32)]
        fused, split = dk.relu_linear_attention_tokens, state_apply_tokens(n)[0]
    else:
        inputs = [make_qkv(2, 2, 16, 2, n // 2, torch.float32).requires_grad_(True)]
        fused, split = (lambda t: dk.relu_linear_attention(t, 16)), state_apply_nchw(16, 2)[0]
    y, y_split = fused(*inputs), split(*inputs)
    grad = torch.randn_like(y)
    results = [(y, *torch.autograd.grad(y, inputs, grad)), (y_split, *torch.autograd.grad(y_split, inputs, grad))]
    for a, b in zip(*results):
        if n > 16:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("tokens", [False, True])
def test_states_of_tiles_add_up(tokens):
    """The states of the tiles of an image (token sets) sum to the whole's; applying that state to a tile gives
    the whole attention's values there."""
    if tokens:
        q, k, v = make_tokens(1, 90, 2, 16, torch.float32)
        parts = [slice(0, 30), slice(30, 31), slice(31, 90)]
        states = [dk.relu_linear_attention_tokens_state(k[:, p], v[:, p]) for p in parts]
        whole, state = dk.relu_linear_attention_tokens_state(k, v), sum(states)
        out = dk.relu_linear_attention_tokens_apply(q[:, 31:], state)
        expected = reference.relu_linear_attention_tokens(*(t.double() for t in (q, k, v)))[:, 31:]
    else:
        qkv = make_qkv(2, 2, 16, 9, 10, torch.float32)
        tiles = [qkv[..., :4, :6], qkv[..., :4, 6:], qkv[..., 4:, :6], qkv[..., 4:, 6:]]
        whole = dk.relu_linear_attention_state(qkv, 16)
        state = sum(dk.relu_linear_attention_state(t, 16) for t in tiles)
        out = dk.relu_linear_attention_apply(tiles[3], state, 16)
        expected = reference.relu_linear_attention(qkv.double(), 16)[..., 4:, 6:]
    assert state.shape == whole.shape and state.dtype == torch.float32
    assert_close(state, whole.double(), torch.float32)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("tokens", [False, True])
def test_state_and_apply_gradcheck_float64(tokens):
    """Numerical gradients through state and apply, and of apply w.r.t. a state given as an input."""
    if tokens:
        inputs = [t.requires_grad_(True) for t in make_tokens(1, 12, 2, 8, torch.float64)]
        fn, _ = state_apply_tokens(5)
        state = reference.relu_linear_attention_tokens_state(*make_tokens(1, 20, 2, 8, torch.float64)[1:])
        apply = [dk.relu_linear_attention_tokens_apply, inputs[0], state.requires_grad_(True)]
    else:
        inputs = [make_qkv(1, 2, 8, 3, 4, torch.float64).requires_grad_(True)]
        fn, _ = state_apply_nchw(8, 2)
        state = reference.relu_linear_attention_state(make_qkv(1, 2, 8, 5, 4, torch.float64), 8)
        apply = [lambda t, s: dk.relu_linear_attention_apply(t, s, 8), inputs[0], state.requires_grad_(True)]
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(apply[0], apply[1:], fast_mode=True)


def test_state_and_apply_opcheck():
    qkv = make_qkv(2, 2, 16, 3, 5, torch.float32).requires_grad_(True)
    state = torch.ops.dcae.relu_linear_attention_state(qkv, 16)
    opcheck(torch.ops.dcae.relu_linear_attention_state.default, (qkv, 16), test_utils=OPCHECK_UTILS)
    opcheck(torch.ops.dcae.relu_linear_attention_apply.default, (qkv, state.detach().requires_grad_(True), 16, 1e-15),
            test_utils=OPCHECK_UTILS)
    opcheck(torch.ops.dcae.relu_linear_attention_state_bwd.default, (torch.randn_like(state), qkv.detach(), 16),
            test_utils=OPCHECK_UTILS)
    opcheck(torch.ops.dcae.relu_linear_attention_apply_bwd.default,
            (torch.randn(2, 32, 3, 5, device=DEVICE), qkv.detach(), state.detach(), 16, 1e-15),
            test_utils=OPCHECK_UTILS)
    q, k, v = (t.requires_grad_(True) for t in make_tokens(2, 15, 2, 16, torch.float32))
    state = torch.ops.dcae.relu_linear_attention_tokens_state(k, v)
    opcheck(torch.ops.dcae.relu_linear_attention_tokens_state.default, (k, v), test_utils=OPCHECK_UTILS)
    opcheck(torch.ops.dcae.relu_linear_attention_tokens_apply.default,
            (q, state.detach().requires_grad_(True), 1e-15), test_utils=OPCHECK_UTILS)
    opcheck(torch.ops.dcae.relu_linear_attention_tokens_state_bwd.default,
            (torch.randn_like(state), k.detach(), v.detach()), test_utils=OPCHECK_UTILS)
    opcheck(torch.ops.dcae.relu_linear_attention_tokens_apply_bwd.default,
            (torch.randn_like(q), q.detach(), state.detach(), 1e-15), test_utils=OPCHECK_UTILS)


def test_state_and_apply_empty_inputs_launch_nothing(monkeypatch):
    monkeypatch.setattr(linear_attention, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched"))
    for shape in ((0, 2, 16, 4, 4), (2, 2, 16, 0, 4), (2, 0, 16, 4, 4)):
        qkv = make_qkv(*shape, torch.float32).requires_grad_(True)
        state = dk.relu_linear_attention_state(qkv, 16)
        assert state.shape == (shape[0], shape[1], 17, 16) and state.eq(0).all()
        y = dk.relu_linear_attention_apply(qkv, state, 16)
        assert y.shape == reference.relu_linear_attention_apply(qkv, state, 16).shape
        (grad,) = torch.autograd.grad((y.sum(), state.sum()), qkv)
        assert grad.shape == qkv.shape
    k, v = (t.requires_grad_(True) for t in make_tokens(2, 0, 3, 16, torch.float32)[:2])
    state = dk.relu_linear_attention_tokens_state(k, v)
    assert state.shape == (2, 3, 17, 16) and state.eq(0).all()
    y = dk.relu_linear_attention_tokens_apply(k, state)
    assert y.shape == k.shape and torch.autograd.grad(state.sum(), v)[0].shape == v.shape


def test_state_and_apply_on_reference_backend(monkeypatch):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    monkeypatch.setattr(linear_attention, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched"))
    qkv = make_qkv(1, 2, 16, 4, 6, torch.float32)
    state = dk.relu_linear_attention_state(qkv, 16)
    torch.testing.assert_close(state, reference.relu_linear_attention_state(qkv, 16))
    torch.testing.assert_close(dk.relu_linear_attention_apply(qkv, state, 16),
                               reference.relu_linear_attention_apply(qkv, state, 16))
    q, k, v = make_tokens(1, 7, 2, 16, torch.float32)
    state = dk.relu_linear_attention_tokens_state(k, v)
    torch.testing.assert_close(state, reference.relu_linear_attention_tokens_state(k, v))
    torch.testing.assert_close(dk.relu_linear_attention_tokens_apply(q, state),
                               reference.relu_linear_attention_tokens_apply(q, state))


# ----------------------------------------------------------------------------------------- NaN and Inf
def with_specials(tokens, n, dtype, head_dim=8, device=DEVICE):
    """Inputs of 3 batches x 4 heads: batch b holds SPECIALS[b] (NaN, +Inf, -Inf) at one token of head h's part h
    (q, k, v) for h < 3; head 3 stays finite."""
    if tokens:
        parts = list(torch.randn(3, 3, n, 4, head_dim, device=device).unbind(0))
        for b, value in enumerate(SPECIALS):
            for part in range(3):
                parts[part] = plant(parts[part], (b, n // 2, part, 3), value)
        return [t.to(dtype) for t in parts]
    qkv = torch.randn(3, 4 * 3 * head_dim, 1, n, device=device)
    for b, value in enumerate(SPECIALS):
        for part in range(3):
            qkv = plant(qkv, (b, (3 * part + part) * head_dim + 3, 0, n // 2), value)
    return [qkv.to(dtype)]


NONFINITE_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf - inf, 0 * inf
@pytest.mark.parametrize("tokens, n, dtype", [(False, 6, torch.float32), (False, 20, torch.float32),
                                              (True, 6, torch.float32), (True, 20, torch.float32),
                                              (False, 20, torch.float16), (True, 6, torch.float16)])
def test_nan_and_inf_propagate_like_reference(tokens, n, dtype):
    """NaN / +-Inf in q, k or v: the same NaN and Inf positions as the reference in the output and every gradient,
    in the quadratic (N = 6 <= head_dim) and linear (N = 20) forms. torch.relu keeps NaN, and its backward
    passes the gradient through at NaN inputs."""
    check_nonfinite(tokens, n, dtype)


def check_nonfinite(tokens, n, dtype, head_dim=8):
    inputs = with_specials(tokens, n, dtype, head_dim)
    if tokens:
        check_nonfinite_like_reference(dk.relu_linear_attention_tokens, reference.relu_linear_attention_tokens,
                                       inputs, NONFINITE_RTOL[dtype])
    else:
        check_nonfinite_like_reference(lambda t: dk.relu_linear_attention(t, head_dim),
                                       lambda t: reference.relu_linear_attention(t, head_dim), inputs,
                                       NONFINITE_RTOL[dtype])


def check_state_and_apply_nonfinite(tokens, n, dtype, head_dim=8):
    """apply to the first n - 2 positions with the state of all n."""
    inputs = with_specials(tokens, n, dtype, head_dim)
    fns = state_apply_tokens(n - 2) if tokens else state_apply_nchw(head_dim, 1)
    if not tokens:
        fns = tuple(lambda t, f=f: f(t)[..., :n - 2] for f in fns)
    check_nonfinite_like_reference(*fns, inputs, NONFINITE_RTOL[dtype])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("tokens", [False, True])
def test_state_and_apply_nan_and_inf_propagate_like_reference(tokens):
    check_state_and_apply_nonfinite(tokens, 6, torch.float32)


# ----------------------------------------------------------------------------------------- fp64, second order
def test_float64_is_exact_to_float64_rounding():
    """fp64 under the interpreter: eps = 0.1 (not an fp32 number) on small queries, so the normaliser is mostly
    eps: the kernels must use eps in fp64 to match the fp64 reference to fp64 rounding."""
    qkv = make_qkv(1, 2, 8, 3, 7, torch.float64)
    qkv.view(1, 2, 3, 8, 3, 7)[:, :, 0] *= 1e-3  # the q blocks
    q, k, v = (t * 1e-3 for t in make_tokens(1, 21, 2, 8, torch.float64))
    state = reference.relu_linear_attention_state(qkv, 8)
    calls = [("relu_linear_attention", (qkv, 8, 0.1)), ("relu_linear_attention", (qkv[..., :1, :4], 8, 0.1)),
             ("relu_linear_attention_apply", (qkv, state, 8, 0.1)), ("relu_linear_attention_tokens", (q, k, v, 0.1))]
    # eps rounded to fp32 gave errors of ~1e-8
    for ours, ref in ((getattr(dk, op)(*args), getattr(reference, op)(*args)) for op, args in calls):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item())


@pytest.mark.parametrize("op", ["fused", "tokens", "state_apply", "tokens_state_apply"])
def test_second_derivatives(op):
    """Double backward (gradgradcheck, fp64): the backward ops' own gradients come from the reference."""
    if op in ("tokens", "tokens_state_apply"):
        inputs = [t.requires_grad_(True) for t in make_tokens(1, 5 if op == "tokens" else 20, 1, 8, torch.float64)]
        fn = dk.relu_linear_attention_tokens if op == "tokens" else state_apply_tokens(3)[0]
    else:
        inputs = [make_qkv(1, 1, 8, 2, 10, torch.float64).requires_grad_(True)]
        fn = (lambda t: dk.relu_linear_attention(t, 8)) if op == "fused" else state_apply_nchw(8, 1)[0]
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


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

    def test_tokens_head_dim_zero(self):
        """relu_linear_attention refuses head_dim 0: so do the token-layout ops."""
        q = torch.randn(1, 4, 2, 0)
        for call in (lambda: dk.relu_linear_attention_tokens(q, q, q),
                     lambda: dk.relu_linear_attention_tokens_state(q, q),
                     lambda: dk.relu_linear_attention_tokens_apply(q, torch.zeros(1, 2, 1, 0))):
            with pytest.raises(ValueError, match="head_dim \\(last axis\\) must be >= 1"):
                call()

    @pytest.mark.parametrize("op", ["state", "apply"])
    def test_state_ops_check_qkv(self, op):
        call = ((lambda t, d: dk.relu_linear_attention_state(t, d)) if op == "state" else
                (lambda t, d: dk.relu_linear_attention_apply(t, torch.zeros(2, 1, 33, 32), d)))
        with pytest.raises(ValueError, match="divisible by 3\\*head_dim = 96"):
            call(torch.randn(2, 64, 4, 4), 32)
        with pytest.raises(TypeError, match="qkv must be float16"):
            call(QKV.int(), 16)
        with pytest.raises(ValueError, match="head_dim must be <= 128"):
            call(torch.randn(1, 3 * 256, 2, 2), 256)

    def test_apply_state_wrong_shape(self):
        with pytest.raises(ValueError, match=r"state must have shape \(B, heads, head_dim\+1, head_dim\) = "
                                             r"\(2, 2, 17, 16\), got \(2, 2, 16, 16\)"):
            dk.relu_linear_attention_apply(QKV, torch.zeros(2, 2, 16, 16), 16)
        with pytest.raises(ValueError, match=r"state must have shape .* = \(2, 2, 17, 16\), got \(1, 2, 17, 16\)"):
            dk.relu_linear_attention_tokens_apply(Q, torch.zeros(1, 2, 17, 16))

    def test_apply_state_wrong_dtype(self):
        with pytest.raises(TypeError, match="state must be torch.float32 .*qkv's torch.float16.*got torch.float16"):
            dk.relu_linear_attention_apply(QKV.half(), torch.zeros(2, 2, 17, 16, dtype=torch.float16), 16)
        with pytest.raises(TypeError, match="state must be torch.float64"):
            dk.relu_linear_attention_tokens_apply(Q.double(), torch.zeros(2, 2, 17, 16))

    def test_apply_state_other_device(self):
        with pytest.raises(ValueError, match="state is on meta but qkv is on"):
            dk.relu_linear_attention_apply(QKV, torch.zeros(2, 2, 17, 16, device="meta"), 16)

    def test_apply_state_not_a_tensor(self):
        with pytest.raises(TypeError, match="state must be a torch.Tensor"):
            dk.relu_linear_attention_tokens_apply(Q, None)

    def test_apply_eps(self):
        with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
            dk.relu_linear_attention_apply(QKV, torch.zeros(2, 2, 17, 16), 16, float("nan"))
        with pytest.raises(TypeError, match="eps must be a float"):
            dk.relu_linear_attention_tokens_apply(Q, torch.zeros(2, 2, 17, 16), "0")

    def test_tokens_state_mismatch(self):
        with pytest.raises(ValueError, match=r"v must have shape \(2, 16, 2, 16\)"):
            dk.relu_linear_attention_tokens_state(Q, Q[:, :8])
        with pytest.raises(TypeError, match="v must have k's dtype"):
            dk.relu_linear_attention_tokens_state(Q, Q.half())

    @pytest.mark.parametrize("eps", [-1e-5, float("inf"), float("nan")])
    def test_eps_rule(self, eps):
        """One rule for eps, every op: a finite float >= 0."""
        for call in (lambda: dk.relu_linear_attention(QKV, 16, eps),
                     lambda: dk.relu_linear_attention_tokens(Q, Q, Q, eps)):
            with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
                call()


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
def test_state_and_apply_cuda_bf16(head_dim):
    """Both layouts: the state, and apply to a region with the whole's state, values and gradients."""
    qkv = make_qkv(2, 3, head_dim, 31, 37, torch.bfloat16)
    check_against_reference(lambda t: dk.relu_linear_attention_state(t, head_dim),
                            lambda t: reference.relu_linear_attention_state(t, head_dim), [qkv])
    check_against_reference(*state_apply_nchw(head_dim, 16), [qkv])
    tokens = make_tokens(2, 1147, 3, head_dim, torch.bfloat16, "strided")
    check_against_reference(*state_apply_tokens(600), tokens)


@pytest.mark.gpu
def test_state_and_apply_torch_compile_fullgraph_fwd_bwd():
    def split(qkv, q, k, v):
        state = dk.relu_linear_attention_state(qkv, 32)
        tokens_state = dk.relu_linear_attention_tokens_state(k, v)
        return (dk.relu_linear_attention_apply(qkv[..., :8, :], state, 32).float().sum()
                + (dk.relu_linear_attention_tokens_apply(q, tokens_state).float() ** 2).sum())

    qkv = make_qkv(2, 4, 32, 24, 24, torch.bfloat16).requires_grad_(True)
    tokens = [t.requires_grad_(True) for t in make_tokens(2, 300, 4, 64, torch.bfloat16)]
    y, y_eager = torch.compile(split, fullgraph=True)(qkv, *tokens), split(qkv, *tokens)
    torch.testing.assert_close(y, y_eager)
    for a, b in zip(torch.autograd.grad(y, (qkv, *tokens)), torch.autograd.grad(y_eager, (qkv, *tokens))):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [False, True])
@pytest.mark.parametrize("n", [12, 300])  # the quadratic and linear forms of the fused op
def test_nan_and_inf_propagate_like_reference_cuda_bf16(tokens, n):
    check_nonfinite(tokens, n, torch.bfloat16, 32)
    check_state_and_apply_nonfinite(tokens, n, torch.bfloat16, 32)


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


def test_reference_sums_in_fp32_under_cpu_autocast(monkeypatch):
    """CPU autocast would run the reference's matmuls in bf16: the state stays in the accumulation dtype, and apply
    takes it (a tiled decode under autocast on CPU)."""
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    qkv = torch.randn(1, 96, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = dk.relu_linear_attention_state(qkv, 32)
        out = dk.relu_linear_attention_apply(qkv, state, 32)
    assert state.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(state, dk.relu_linear_attention_state(qkv, 32))
