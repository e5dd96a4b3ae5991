"""space_to_channel_avg / channel_to_space_dup against the einops reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import dcae_kernels as dk
from dcae_kernels import reference, shortcut
from dcae_kernels.nn import ChannelToSpaceDup, SpaceToChannelAvg

from .device import DEVICE, OPCHECK_UTILS
from .nonfinite import SPECIALS, check_nonfinite_like_reference, plant

TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}
OPS = {"down": (dk.space_to_channel_avg, reference.space_to_channel_avg),
       "up": (dk.channel_to_space_dup, reference.channel_to_space_dup)}


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def make_case(direction, batch, c_high, group, factor, hl, wl, dtype, residual, layout, device=DEVICE):
    """Inputs for one call. ``c_high`` = channels of the high-res tensor; ``group`` = G (down) or R (up)."""
    c_low = c_high * factor * factor // group
    hi, lo = (batch, c_high, hl * factor, wl * factor), (batch, c_low, hl, wl)
    x_shape, out_channels, y_shape = (hi, c_low, lo) if direction == "down" else (lo, c_high, hi)
    x = torch.randn(x_shape, device=device, dtype=torch.float32)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a non-contiguous view: every other column of a wider tensor
        x = torch.randn(*x_shape[:3], 2 * x_shape[3], device=device)[..., ::2]
    res = torch.randn(y_shape, device=device) if residual else None
    return x.to(dtype), out_channels, factor, None if res is None else res.to(dtype)


@st.composite
def cases(draw, dtypes):
    factor = draw(st.sampled_from([1, 2, 3, 4]))
    c_high = draw(st.integers(1, 6))
    return dict(batch=draw(st.integers(1, 3)), c_high=c_high,
                group=draw(st.sampled_from(divisors(c_high * factor * factor))), factor=factor,
                hl=draw(st.integers(1, 5)), wl=draw(st.integers(1, 7)), dtype=draw(st.sampled_from(dtypes)),
                residual=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])))


def check_against_reference(direction, case):
    """Forward and every gradient equal the reference evaluated in float32 (float64 for float64 inputs)."""
    op, ref = OPS[direction]
    x, out_channels, factor, res = make_case(direction, **case)
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    inputs = [t for t in (x, res) if t is not None]
    for t in inputs:
        t.requires_grad_(True)
    y = op(x, out_channels, factor, res)
    ref_inputs = [t.detach().to(wide).requires_grad_(True) for t in inputs]
    y_ref = ref(ref_inputs[0], out_channels, factor, ref_inputs[1] if res is not None else None)
    atol, rtol = TOL[x.dtype]
    assert y.dtype == x.dtype and y.shape == y_ref.shape
    torch.testing.assert_close(y.to(wide), y_ref, atol=atol, rtol=rtol)
    grad = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, grad.to(wide))
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == x.dtype
        torch.testing.assert_close(g.to(wide), g_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("direction", ["down", "up"])
@given(case=cases([torch.float32, torch.float16]))
def test_matches_reference(direction, case):
    check_against_reference(direction, case)


@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_every_group_size(direction, factor):
    """Each group size G (down) / repeat count R (up) that divides 4*f*f, forward and backward, fp32."""
    for group in divisors(4 * factor * factor):
        check_against_reference(direction, dict(batch=2, c_high=4, group=group, factor=factor, hl=3, wl=5,
                                                dtype=torch.float32, residual=group % 2 == 0, layout="contiguous"))


@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_float64(direction, residual):
    """Numerical gradients, first and second order (the backward runs the other op)."""
    op, _ = OPS[direction]
    x, out_channels, factor, res = make_case(direction, 1, 3, 3 if direction == "down" else 6, 2, 2, 3,
                                             torch.float64, residual, "contiguous")
    inputs = tuple(t.requires_grad_(True) for t in (x, res) if t is not None)
    fn = lambda *t: op(t[0], out_channels, factor, t[1] if residual else None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(direction, residual):
    x, out_channels, factor, res = make_case(direction, 2, 4, 2, 2, 3, 4, torch.float32, residual, "contiguous")
    x.requires_grad_(True)
    op = torch.ops.dcae.space_to_channel_avg if direction == "down" else torch.ops.dcae.channel_to_space_dup
    opcheck(op.default, (x, out_channels, factor, res), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("direction", ["down", "up"])
def test_empty_batch_launches_nothing(direction, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for an empty input")
    monkeypatch.setattr(shortcut, "_launch", no_launch)
    op, ref = OPS[direction]
    x, out_channels, factor, res = make_case(direction, 0, 4, 2, 2, 3, 3, torch.float32, True, "contiguous")
    x.requires_grad_(True)
    y = op(x, out_channels, factor, res)
    assert y.shape == ref(x, out_channels, factor, res).shape and y.numel() == 0
    (grad_x,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert grad_x.shape == x.shape


@pytest.mark.parametrize("direction", ["down", "up"])
def test_modules_match_functional(direction):
    x, out_channels, factor, res = make_case(direction, 2, 4, 2, 2, 2, 3, torch.float32, True, "contiguous")
    in_channels = x.shape[1]
    module = (SpaceToChannelAvg if direction == "down" else ChannelToSpaceDup)(in_channels, out_channels, factor)
    torch.testing.assert_close(module(x, res), OPS[direction][0](x, out_channels, factor, res))
    assert module(x).shape == res.shape
    with pytest.raises(ValueError, match="channels"):
        module(torch.randn(2, in_channels + 1, *x.shape[2:]))


@pytest.mark.parametrize("module, args, name", [(SpaceToChannelAvg, (4, 0, 2), "out_channels"),
                                                (ChannelToSpaceDup, (0, 8, 2), "in_channels"),
                                                (SpaceToChannelAvg, (4, 8, 0), "factor")])
def test_module_rejects_zero_sizes(module, args, name):
    """A clear ValueError, not a ZeroDivisionError from the divisibility check."""
    with pytest.raises(ValueError, match=f"{name} must be >= 1"):
        module(*args)


def test_module_rejects_indivisible_channels():
    with pytest.raises(ValueError, match="must divide"):
        SpaceToChannelAvg(3, 5, 2)
    with pytest.raises(ValueError, match="must divide"):
        ChannelToSpaceDup(5, 3, 1)  # 5 input channels do not divide 3 outputs


def test_compiles_without_graph_breaks_on_reference(monkeypatch):
    """The dispatch (backend choice, checks) traces under torch.compile(fullgraph=True)."""
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    fn = lambda x, r: dk.channel_to_space_dup(dk.space_to_channel_avg(x, 8, 2), 4, 2, r)  # noqa: E731
    x, r = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(x, r), fn(x, r))


def check_nonfinite(direction, residual, dtype, size=(2, 3), rtol=1e-5):
    """NaN / +-Inf in x (and the residual): the same NaN and Inf positions as the reference, forward and backward
    (G = R = 3: a group mixing NaN with +Inf gives NaN, +Inf with -Inf too)."""
    x, out_channels, factor, res = make_case(direction, 2, 3, 3, 2, *size, dtype, residual, "contiguous")
    for i, value in enumerate(SPECIALS):
        x = plant(x, (i % 2, i, i % 2, i), value)
        x = plant(x, (1, 2, 1, i), value)
        if residual:
            res = plant(res, (0, i, 0, i), value)
    op, ref = OPS[direction]
    fn = lambda f: lambda *t: f(t[0], out_channels, factor, t[1] if residual else None)  # noqa: E731
    check_nonfinite_like_reference(fn(op), fn(ref), [t for t in (x, res) if t is not None], rtol)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf - inf
@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("residual", [False, True])
def test_nan_and_inf_propagate_like_reference(direction, residual):
    check_nonfinite(direction, residual, torch.float32)


@pytest.mark.parametrize("direction", ["down", "up"])
def test_float64_is_exact_to_float64_rounding(direction):
    """fp64 under the interpreter, G = R = 3: down's backward scales by 1/3, which rounded to fp32 was ~1e-8 off."""
    x, out_channels, factor, _ = make_case(direction, 1, 3, 3, 2, 2, 3, torch.float64, False, "contiguous")
    x.requires_grad_(True)
    op, ref = OPS[direction]
    y, y_ref = op(x, out_channels, factor), ref(x, out_channels, factor)
    grad = torch.randn_like(y)
    for ours, expected in ((y, y_ref), (torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(y_ref, x, grad)[0])):
        torch.testing.assert_close(ours, expected, rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------------------- bad input
X = torch.randn(2, 4, 6, 6)


@pytest.mark.parametrize("op", [dk.space_to_channel_avg, dk.channel_to_space_dup])
class TestBadInput:
    def test_rank_not_4(self, op):
        with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
            op(torch.randn(4, 6, 6), 4, 2)

    def test_integer_dtype(self, op):
        with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
            op(torch.ones(2, 4, 6, 6, dtype=torch.int32), 4, 2)

    def test_bool_dtype(self, op):
        with pytest.raises(TypeError, match="x must be float"):
            op(torch.ones(2, 4, 6, 6, dtype=torch.bool), 4, 2)

    def test_not_a_tensor(self, op):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            op(X.numpy(), 4, 2)

    def test_factor_zero(self, op):
        with pytest.raises(ValueError, match="factor must be >= 1"):
            op(X, 4, 0)

    def test_factor_not_int(self, op):
        with pytest.raises(TypeError, match="factor must be an int"):
            op(X, 4, 2.0)

    def test_out_channels_zero(self, op):
        with pytest.raises(ValueError, match="out_channels must be >= 1"):
            op(X, 0, 2)

    def test_residual_wrong_shape(self, op):
        with pytest.raises(ValueError, match="residual must have shape"):
            op(X, 4, 2, torch.randn(2, 4, 5, 5))

    def test_residual_wrong_dtype(self, op):
        y = op(X, 4, 2)
        with pytest.raises(TypeError, match="residual must have x's dtype"):
            op(X, 4, 2, y.double())

    def test_residual_on_other_device(self, op):
        y = op(X, 4, 2)
        with pytest.raises(ValueError, match="residual is on meta but x is on"):
            op(X, 4, 2, y.to("meta"))

    def test_residual_not_a_tensor(self, op):
        with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
            op(X, 4, 2, 1.0)


def test_down_spatial_not_divisible():
    with pytest.raises(ValueError, match="divisible by factor=2, got 5x6"):
        dk.space_to_channel_avg(torch.randn(1, 4, 5, 6), 4, 2)
    with pytest.raises(ValueError, match="divisible by factor=4, got 8x6"):
        dk.space_to_channel_avg(torch.randn(1, 4, 8, 6), 4, 4)


def test_down_channels_not_dividing():
    with pytest.raises(ValueError, match="out_channels must divide C"):
        dk.space_to_channel_avg(X, 5, 2)


def test_down_group_below_one():
    with pytest.raises(ValueError, match="integer >= 1"):
        dk.space_to_channel_avg(X, 32, 2)


def test_up_channels_not_dividing():
    with pytest.raises(ValueError, match="C=4 must divide out_channels"):
        dk.channel_to_space_dup(X, 3, 1)


def test_factor_too_large():
    with pytest.raises(ValueError, match="factor must be <="):
        dk.space_to_channel_avg(X, 4, shortcut.MAX_FACTOR + 1)


# ----------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["down", "up"])
@settings(max_examples=8)
@given(case=cases([torch.bfloat16, torch.float16, torch.float32]))
def test_matches_reference_cuda(direction, case):
    check_against_reference(direction, case)


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["down", "up"])
@pytest.mark.parametrize("residual", [False, True])
def test_nan_and_inf_propagate_like_reference_cuda_bf16(direction, residual):
    check_nonfinite(direction, residual, torch.bfloat16, (32, 48), rtol=1.6e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 256, 128, 128, 512), (2, 512, 64, 64, 1024), (2, 1024, 16, 16, 32, 1)])
def test_dcae_shapes_bf16(shape):
    """DC-AE's own shortcut shapes in bf16: (B, C_in, H, W, C_out[, factor]), both directions."""
    batch, c_in, h, w, c_out, *f = shape
    factor = f[0] if f else 2
    group = c_in * factor * factor // c_out
    for direction, c_high in (("down", c_in), ("up", c_in)):
        check_against_reference(direction, dict(batch=batch, c_high=c_high, group=group, factor=factor,
                                                hl=h // factor, wl=w // factor, dtype=torch.bfloat16,
                                                residual=True, layout="contiguous"))


@pytest.mark.gpu
def test_more_than_2_pow_31_elements():
    """int64 offsets: a 2.2e9-element input (4.4 GB bf16) and its 1.1e9-element output, compared in chunks."""
    x = torch.randn(1, 130, 4096, 4096, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    y = dk.space_to_channel_avg(x, 260, 2)
    z = dk.channel_to_space_dup(y, 130, 2)
    for c in range(0, 130, 26):  # the last chunks sit past element 2**31
        torch.testing.assert_close(y[:, 2 * c:2 * c + 52], reference.space_to_channel_avg(x[:, c:c + 26], 52, 2),
                                   atol=1.6e-2, rtol=1.6e-2)
        assert torch.equal(z[:, c:c + 26], reference.channel_to_space_dup(y[:, 2 * c:2 * c + 52], 26, 2))


@pytest.mark.gpu
def test_torch_compile_fullgraph_fwd_bwd():
    def block(x, conv_out):
        down = dk.space_to_channel_avg(x, 64, 2, conv_out)
        return dk.channel_to_space_dup(down, 32, 2, x)

    x = torch.randn(2, 32, 64, 64, device="cuda", requires_grad=True)
    c = torch.randn(2, 64, 32, 32, device="cuda", requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    y, y_eager = compiled(x, c), block(x, c)
    torch.testing.assert_close(y, y_eager)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, c), g), torch.autograd.grad(y_eager, (x, c), g)):
        torch.testing.assert_close(a, b)
