"""rms_norm_2d (DC-AE's RMSNorm2d, optionally fused with the residual add) against the fp64 reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import dcae_kernels as dk
from dcae_kernels import norm, reference
from dcae_kernels.nn import RMSNorm2d

from .allocations import record_allocations
from .device import DEVICE, OPCHECK_UTILS
from .nonfinite import SPECIALS, check_nonfinite_like_reference, plant

# Relative to the largest reference magnitude: fp32 accumulation; fp16 / bf16 outputs rounded once.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(batch, channels, height, width, dtype, residual=True, layout="contiguous", weight_dtype=None,
                device=DEVICE):
    """x (in ``layout``), weight and bias (random, in ``weight_dtype``, default x's) and the residual or None."""
    x = torch.randn(batch, channels, height, width, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # every other column of a wider tensor
        x = torch.randn(batch, channels, height, 2 * width, device=device)[..., ::2]
    weight_dtype = weight_dtype or dtype
    weight = (1 + 0.5 * torch.randn(channels, device=device)).to(weight_dtype)
    bias = (0.5 * torch.randn(channels, device=device)).to(weight_dtype)
    res = torch.randn(batch, channels, height, width, device=device).to(dtype) if residual else None
    return x.to(dtype), weight, bias, res


def assert_close(actual, expected, dtype, eager=None, scale=0.0):
    """actual ~ expected (fp64) within TOL of the larger of expected's largest magnitude and ``scale`` (that of the
    terms a result is the difference of), plus 4x the error of ``eager`` (the reference run in the inputs' dtypes)
    and the dtype's subnormal spacing (the rounding step of results that cancel to ~0 in fp16)."""
    tol, info = TOL[dtype], torch.finfo(dtype)
    atol = tol * max(expected.abs().max().item(), scale) + info.tiny * info.eps
    if eager is not None:
        atol += 4 * (eager.double() - expected).abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=atol)


def check_against_reference(x, weight, bias, res, eps=1e-5):
    """Forward and the gradients of x, weight, bias and the residual equal the reference run in fp64 on the same
    values, as closely as the reference run in the inputs' dtypes does."""
    inputs = [t for t in (x, weight, bias, res) if t is not None]

    def run(fn, cast, grad=None):
        xs = [cast(t.detach()).requires_grad_(True) for t in inputs]
        y = fn(xs[0], xs[1], xs[2], eps, xs[3] if res is not None else None)
        grad = torch.randn_like(y) if grad is None else grad.to(y.dtype)
        return y, torch.autograd.grad(y, xs, grad), grad

    y, grads, grad = run(dk.rms_norm_2d, lambda t: t)
    y_ref, grads_ref, _ = run(reference.rms_norm_2d, torch.Tensor.double, grad)
    y_eager, grads_eager, _ = run(reference.rms_norm_2d, lambda t: t, grad)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, y_ref, x.dtype, y_eager)
    # dx = rstd * (w dy - xhat mean_c(w dy xhat)) cancels to ~0 where C is small (exactly at C = 1 and eps = 0)
    x64 = x.double()
    dx_scale = (torch.rsqrt(x64.square().mean(1, keepdim=True) + eps) * weight.double()[:, None, None]
                * grad.double()).abs().max().item()
    for t, g, g_ref, g_eager, scale in zip(inputs, grads, grads_ref, grads_eager, (dx_scale, 0, 0, 0)):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, g_ref, t.dtype, g_eager, scale)
    return y, grads


@st.composite
def cases(draw, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    torch.manual_seed(draw(st.integers(0, 2**16)))  # the random values are part of the example
    return dict(batch=draw(st.integers(1, 3)),
                channels=draw(st.one_of(st.sampled_from([1, 3, 17, 64, 130]), st.integers(1, 40))),
                height=draw(st.integers(1, 9)), width=draw(st.integers(1, 9)), dtype=dtype,
                residual=draw(st.booleans()), layout=draw(st.sampled_from(["contiguous", "channels_last", "strided"])),
                weight_dtype=draw(st.sampled_from([dtype, torch.float32])))


@settings(max_examples=60)
@given(case=cases([torch.float32, torch.float16]))
def test_matches_reference(case):
    check_against_reference(*make_inputs(**case))


# Under the interpreter the forward runs one pass up to 32 channels and the backward up to 16; more take two passes
# (several channel chunks, the last partial). 300 pixels: several pixel blocks and backward chunks.
@pytest.mark.parametrize("channels", [1, 2, 15, 16, 17, 32, 33, 100])
def test_channel_counts(channels):
    check_against_reference(*make_inputs(2, channels, 12, 25, torch.float32))


def test_gradcheck_float64():
    """Numerical gradients of the fp64 kernels (the interpreter runs them; a GPU runs the reference for fp64), in
    the one-pass form and the two-pass form."""
    for channels in (5, 40):
        inputs = [t.requires_grad_(True) for t in make_inputs(2, channels, 3, 5, torch.float64)]
        fn = lambda x, w, b, r: dk.rms_norm_2d(x, w, b, 1e-5, r)  # noqa: E731
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_extreme_magnitudes():
    """Large, tiny and all-zero pixels: rstd saturates at rsqrt(eps), gradients stay finite."""
    x, weight, bias, res = make_inputs(1, 8, 4, 6, torch.float32)
    x[..., 0, :] *= 1e4
    x[..., 1, :] *= 1e-4
    x[..., 2, :] = 0
    y, grads = check_against_reference(x, weight, bias, res, eps=1e-3)
    assert all(g.isfinite().all() for g in grads)
    torch.testing.assert_close(y[0, :, 2], bias[:, None] + res[0, :, 2])


def test_fused_add_at_least_as_accurate():
    """fp16: norm + residual rounded once (fused) is no less accurate than the model's former res + norm(x)."""
    torch.manual_seed(0)
    x, weight, bias, res = make_inputs(2, 16, 16, 16, torch.float16)
    exact = reference.rms_norm_2d(x.double(), weight.double(), bias.double(), 1e-5, res.double())
    fused = dk.rms_norm_2d(x, weight, bias, 1e-5, res)
    unfused = res + dk.rms_norm_2d(x, weight, bias)
    err_fused, err_unfused = ((t.double() - exact).abs() for t in (fused, unfused))
    assert err_fused.max() <= err_unfused.max() and err_fused.mean() < err_unfused.mean()


@pytest.fixture
def allocations(monkeypatch):
    """Shapes of the outputs the op allocates (NaN-poisoned by conftest's fixture)."""
    return record_allocations(monkeypatch, norm)


def test_every_output_is_written(allocations):
    """y, rstd, dx and the dw / db partials start as NaN: every element the kernels skip would show."""
    check_against_reference(*make_inputs(2, 5, 7, 9, torch.float32))
    check_against_reference(*make_inputs(1, 40, 5, 7, torch.float32))
    assert {(2, 5, 7, 9), (2, 63), (1, 40, 5, 7), (1, 35)} <= set(allocations)
    assert any(len(s) == 3 and s[0] == 2 and s[2] == 40 for s in allocations)  # (2, programs, C) partials


@pytest.mark.parametrize("shape, dtype", [((2, 24, 20, 20), torch.float32),
                                          pytest.param((8, 256, 128, 128), torch.bfloat16, marks=pytest.mark.gpu)])
def test_deterministic(shape, dtype):
    """dw and db are per-program partials summed by torch in a fixed order: runs agree bit for bit."""
    inputs = [t.requires_grad_(True) for t in make_inputs(*shape, dtype)]
    grad = torch.randn_like(inputs[0])
    runs = [(y := dk.rms_norm_2d(*inputs[:3], 1e-5, inputs[3]), *torch.autograd.grad(y, inputs, grad))
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_residual_gradient_is_grad_output():
    x, weight, bias, res = (t.requires_grad_(True) for t in make_inputs(1, 4, 3, 3, torch.float32))
    y = dk.rms_norm_2d(x, weight, bias, 1e-5, res)
    grad = torch.randn_like(y)
    (g_res,) = torch.autograd.grad(y, res, grad)
    assert torch.equal(g_res, grad)


def test_only_some_inputs_need_grad():
    x, weight, bias, _ = make_inputs(1, 4, 3, 3, torch.float32)
    weight.requires_grad_(True)
    y = dk.rms_norm_2d(x, weight, bias)
    (g,) = torch.autograd.grad(y.sum(), weight)
    torch.testing.assert_close(g, (x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-5)).sum((0, 2, 3)))


def test_empty_inputs_launch_nothing(monkeypatch):
    monkeypatch.setattr(norm, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched"))
    for shape in ((0, 4, 3, 3), (2, 4, 0, 3), (2, 0, 3, 3)):
        x, weight, bias, res = (t.requires_grad_(True) for t in make_inputs(*shape, torch.float32))
        y = dk.rms_norm_2d(x, weight, bias, 1e-5, res)
        assert y.shape == x.shape and y.dtype == x.dtype
        grads = torch.autograd.grad(y, (x, weight, bias, res), torch.ones_like(y))
        assert [g.shape for g in grads] == [x.shape, weight.shape, bias.shape, res.shape]
        assert grads[1].eq(0).all() and grads[2].eq(0).all()


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual):
    x, weight, bias, res = (t.requires_grad_(True) if t is not None else t
                            for t in make_inputs(2, 5, 3, 4, torch.float32, residual))
    opcheck(torch.ops.dcae.rms_norm_2d.default, (x, weight, bias, 1e-5, res), test_utils=OPCHECK_UTILS)


def test_opcheck_backward_op():
    x, weight, bias, _ = make_inputs(2, 5, 3, 4, torch.float32, False)
    _, rstd = torch.ops.dcae.rms_norm_2d(x, weight, bias, 1e-5)
    opcheck(torch.ops.dcae.rms_norm_2d_bwd.default, (torch.randn_like(x), x, weight, rstd, 1e-5),
            test_utils=OPCHECK_UTILS)


def test_op_returns_rstd():
    x, weight, bias, _ = make_inputs(2, 6, 3, 4, torch.float16, False)
    y, rstd = torch.ops.dcae.rms_norm_2d(x, weight, bias, 1e-5)
    assert rstd.shape == (2, 12) and rstd.dtype == torch.float32 and not rstd.requires_grad
    expected = torch.rsqrt(x.double().square().mean(1) + 1e-5).view(2, 12)
    torch.testing.assert_close(rstd.double(), expected, rtol=1e-5, atol=0)


def test_module_matches_functional():
    x, _, _, res = make_inputs(2, 6, 4, 5, torch.float32)
    module = RMSNorm2d(6).to(DEVICE)
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    assert [n for n, _ in module.named_parameters()] == ["weight", "bias"] and module.eps == 1e-5
    torch.testing.assert_close(module(x, res), dk.rms_norm_2d(x, module.weight, module.bias, 1e-5, res))
    torch.testing.assert_close(module(x), dk.rms_norm_2d(x, module.weight, module.bias))
    # a residual of another dtype (autocast) is added after the op, with type promotion
    y = module(x.half(), res)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, res + module(x.half()))
    assert "6, eps=1e-05" in repr(module)
    with pytest.raises(ValueError, match="channels must be >= 1"):
        RMSNorm2d(0)


def test_module_checks_the_shape_of_a_residual_of_another_dtype():
    """The unfused path (residual dtype != x's) must not broadcast (1, C, H, W) + (B, C, H, W)."""
    module = RMSNorm2d(4).to(DEVICE)
    x, res = torch.randn(1, 4, 2, 2, device=DEVICE), torch.randn(3, 4, 2, 2, device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(1, 4, 2, 2\), got \(3, 4, 2, 2\)"):
        module(x, res)


def test_reference_backend(monkeypatch):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    monkeypatch.setattr(norm, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched"))
    x, weight, bias, res = make_inputs(1, 6, 4, 5, torch.float32)
    torch.testing.assert_close(dk.rms_norm_2d(x, weight, bias, 1e-5, res),
                               reference.rms_norm_2d(x, weight, bias, 1e-5, res))


def test_compiles_without_graph_breaks_on_reference(monkeypatch):
    """The dispatch (backend choice, checks) traces under torch.compile(fullgraph=True)."""
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    fn = lambda x, w, b: dk.rms_norm_2d(x, w, b, 1e-5, x)  # noqa: E731
    x, w, b = torch.randn(2, 8, 4, 4), torch.randn(8), torch.randn(8)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="eager")(x, w, b), fn(x, w, b))


# ----------------------------------------------------------------------------------------- NaN, fp64, 2nd order
def check_nonfinite(where, channels, dtype, size=(3, 5), rtol=1e-4):
    """NaN / +-Inf in an input, or an all-zero pixel with eps = 0 (rsqrt(0) = inf): the same NaN and Inf
    positions as the reference in y and every gradient."""
    x, weight, bias, res = make_inputs(2, channels, *size, dtype)
    eps = 1e-5
    if where in ("x", "residual"):
        for i, value in enumerate(SPECIALS):
            if where == "x":
                x = plant(x, (i % 2, 3, i, 2 * i), value)
            else:
                res = plant(res, (i % 2, 3, i, 2 * i), value)
    elif where == "weight":
        weight = plant(weight, (2,), float("nan"))
    else:
        x, eps = plant(x, (1, slice(None), 2, 3), 0.0), 0.0
    fn = lambda f: lambda x, w, b, r: f(x, w, b, eps, r)  # noqa: E731
    check_nonfinite_like_reference(fn(dk.rms_norm_2d), fn(reference.rms_norm_2d), [x, weight, bias, res], rtol)


WHERE = ["x", "residual", "weight", "zero pixel, eps = 0"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf - inf, 0 * inf
@pytest.mark.parametrize("channels", [5, 40])  # one pass and two passes under the interpreter
@pytest.mark.parametrize("where", WHERE)
def test_nan_and_inf_propagate_like_reference(channels, where):
    check_nonfinite(where, channels, torch.float32)


def test_float64_is_exact_to_float64_rounding():
    """fp64 under the interpreter with eps = 0.1 (not an fp32 number) on small x, where eps dominates rstd: the
    kernels must use eps in fp64 (rounded to fp32 it gave errors of ~1e-9)."""
    x, weight, bias, res = make_inputs(2, 5, 3, 4, torch.float64)
    x = (x * 1e-2).requires_grad_(True)
    y = dk.rms_norm_2d(x, weight, bias, 0.1, res)
    y_ref = reference.rms_norm_2d(x, weight, bias, 0.1, res)
    grad = torch.randn_like(y)
    for ours, ref in ((y, y_ref), (torch.autograd.grad(y, x, grad)[0], torch.autograd.grad(y_ref, x, grad)[0])):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12 * ref.abs().max().item())


def test_second_derivatives():
    """Double backward (gradgradcheck, fp64): the backward op's own gradients come from the reference."""
    inputs = [t.requires_grad_(True) for t in make_inputs(1, 5, 2, 3, torch.float64)]
    fn = lambda x, w, b, r: dk.rms_norm_2d(x, w, b, 1e-5, r)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


# ----------------------------------------------------------------------------------------- bad input
X, W = torch.randn(2, 4, 3, 3), torch.ones(4)


class TestBadInput:
    def test_rank_not_4(self):
        with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
            dk.rms_norm_2d(torch.randn(4, 3, 3), W, W)

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
            dk.rms_norm_2d(X.int(), W, W)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            dk.rms_norm_2d(X.numpy(), W, W)

    def test_weight_wrong_length(self):
        with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(4,\)"):
            dk.rms_norm_2d(X, torch.ones(5), W)

    def test_weight_wrong_rank(self):
        with pytest.raises(ValueError, match=r"weight must have shape \(C,\) = \(4,\) \(rank 1\)"):
            dk.rms_norm_2d(X, torch.ones(4, 1), W)

    def test_weight_integer_dtype(self):
        with pytest.raises(TypeError, match="weight must be float16"):
            dk.rms_norm_2d(X, torch.ones(4, dtype=torch.int64), W)

    def test_weight_on_other_device(self):
        with pytest.raises(ValueError, match="weight is on meta but x is on"):
            dk.rms_norm_2d(X, W.to("meta"), W)

    def test_bias_wrong_length(self):
        with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
            dk.rms_norm_2d(X, W, torch.ones(3))

    def test_bias_dtype_not_weights(self):
        with pytest.raises(TypeError, match="bias must have weight's dtype"):
            dk.rms_norm_2d(X, W, W.double())

    def test_bias_not_a_tensor(self):
        with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
            dk.rms_norm_2d(X, W, None)

    @pytest.mark.parametrize("eps", [-1e-5, float("inf"), float("nan")])
    def test_eps_not_finite_nonnegative(self, eps):
        """The one rule for every op's eps: a finite float >= 0 (0 is allowed: see test_nan_and_inf...)."""
        with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
            dk.rms_norm_2d(X, W, W, eps)

    def test_eps_not_a_number(self):
        with pytest.raises(TypeError, match="eps must be a float"):
            dk.rms_norm_2d(X, W, W, "1e-5")

    def test_residual_wrong_shape(self):
        with pytest.raises(ValueError, match=r"residual must have shape \(2, 4, 3, 3\)"):
            dk.rms_norm_2d(X, W, W, 1e-5, X[:1])

    def test_residual_wrong_dtype(self):
        with pytest.raises(TypeError, match="residual must have x's dtype"):
            dk.rms_norm_2d(X, W, W, 1e-5, X.double())

    def test_residual_on_other_device(self):
        with pytest.raises(ValueError, match="residual is on meta but x is on"):
            dk.rms_norm_2d(X, W, W, 1e-5, X.to("meta"))


# ----------------------------------------------------------------------------------------- sm_90 code
def fwd_spec(dtype, cp, one_pass, block, num_warps, residual=True, scalar="fp32", weight="bf16"):
    ptrs = {"x_ptr": dtype, "w_ptr": weight, "b_ptr": weight, "res_ptr": dtype, "y_ptr": dtype, "rstd_ptr": "fp32"}
    return dict(module="dcae_kernels.norm", kernel="rms_norm_2d_fwd_kernel", num_warps=num_warps,
                signature={**{p: f"*{t}" for p, t in ptrs.items()}, "eps": scalar, "C": "i32", "HW": "i32"},
                aligned=[*ptrs, "C", "HW"], constexprs=dict(CP=cp, ONE_PASS=one_pass, HAS_RES=residual, BLOCK=block))


def bwd_spec(dtype, cp, one_pass, block, num_warps, weight="bf16"):
    ptrs = {"x_ptr": dtype, "w_ptr": weight, "dy_ptr": dtype, "rstd_ptr": "fp32", "dx_ptr": dtype, "dwb_ptr": "fp32"}
    return dict(module="dcae_kernels.norm", kernel="rms_norm_2d_bwd_kernel", num_warps=num_warps,
                signature={**{p: f"*{t}" for p, t in ptrs.items()}, "C": "i32", "HW": "i32", "CHUNK": "i32"},
                aligned=[*ptrs, "C", "HW", "CHUNK"], constexprs=dict(CP=cp, ONE_PASS=one_pass, BLOCK=block))


# The GPU configs (BLOCK / warps as in norm.FWD_CONFIGS / _BWD_CONFIGS), bf16, at DC-AE's
# channel counts: one pass up to 1024 forward / 512 backward, two passes beyond (2048 forward, 1024 backward).
FWD_CONFIGS, BWD_CONFIGS = ((4096, 4), (8192, 8), (16384, 16)), ((2048, 4), (4096, 8), (8192, 16))
SM90 = {f"fwd C{c} +add {b}/{w}": fwd_spec("bf16", c, c <= 1024, b, w) for b, w in FWD_CONFIGS
        for c in (16, 128, 256, 512, 1024, 2048)}
SM90.update({f"bwd C{c} {b}/{w}": bwd_spec("bf16", c, c <= 512, b, w) for b, w in BWD_CONFIGS
             for c in (16, 128, 256, 512, 1024)})
SM90.update({
    # torch.compile (Inductor) passes the Python float eps as an fp64 scalar
    "fwd C256 +add 8192/8, fp64 eps (Inductor)": fwd_spec("bf16", 256, True, 8192, 8, scalar="fp64"),
    "fwd C2048 +add 8192/8, fp64 eps (Inductor)": fwd_spec("bf16", 2048, False, 8192, 8, scalar="fp64"),
    # autocast: bf16 activations, fp32 parameters
    "fwd C256 +add 8192/8, fp32 weight": fwd_spec("bf16", 256, True, 8192, 8, weight="fp32"),
    "bwd C256 4096/8, fp32 weight": bwd_spec("bf16", 256, True, 4096, 8, weight="fp32"),
    "fwd C256 8192/8 fp32": fwd_spec("fp32", 256, True, 8192, 8, residual=False, weight="fp32"),
    "bwd C256 4096/8 fp32": bwd_spec("fp32", 256, True, 4096, 8, weight="fp32"),
})


def vectors_per_tensor(name: str, spec: dict) -> int:
    """16-byte accesses per thread to one (B, C, HW) tensor in one pass over it."""
    block, elem = spec["constexprs"]["BLOCK"], 4 if spec["signature"]["x_ptr"] == "*fp32" else 2
    return block // (32 * spec["num_warps"]) * elem // 16


@pytest.mark.parametrize("name", list(SM90))
def test_sm90_compiles_without_spills(sm90, name):
    assert "error" not in sm90[name] and sm90[name]["stack"] == 0, sm90[name]


# Tiles of >= 16 pixels (8 bf16 = 16 bytes per thread along a channel row): every x / res / y (x / dy / dx) access is
# a 16-byte vector. (The configs that give 1024 channels 4 pixels lose to the others in autotuning.)
@pytest.mark.parametrize("name", [n for n, s in SM90.items()
                                  if s["constexprs"]["BLOCK"] // s["constexprs"]["CP"] >= 16
                                  or not s["constexprs"]["ONE_PASS"]])
def test_sm90_moves_tiles_in_16_byte_vectors(sm90, name):
    spec, ops = SM90[name], sm90[name]["global_ops"]
    n = vectors_per_tensor(name, spec)
    passes = 1 if spec["constexprs"]["ONE_PASS"] else 2
    if name.startswith("fwd"):
        loads, stores = n * (passes + spec["constexprs"]["HAS_RES"]), n
    else:
        loads, stores = 2 * n * passes, n
    assert ops.get("ld.global.v4.b32", 0) >= loads and ops.get("st.global.v4.b32", 0) >= stores, ops


# ----------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@settings(max_examples=10)
@given(case=cases([torch.bfloat16, torch.float16, torch.float32]))
def test_matches_reference_cuda(case):
    check_against_reference(*make_inputs(**case))


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [256, 2048])  # one pass and two passes
@pytest.mark.parametrize("where", WHERE)
def test_nan_and_inf_propagate_like_reference_cuda_bf16(channels, where):
    check_nonfinite(where, channels, torch.bfloat16, (16, 16), rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 256, 64, 64), (4, 512, 32, 32), (2, 1024, 16, 16), (2, 2048, 8, 8),
                                   (2, 128, 256, 256), (3, 96, 17, 33)])
def test_dcae_shapes_bf16(shape):
    """DC-AE's channel counts (one and two passes), bf16 with fp32 weights (autocast) and with bf16 weights."""
    check_against_reference(*make_inputs(*shape, torch.bfloat16, weight_dtype=torch.float32))
    check_against_reference(*make_inputs(*shape, torch.bfloat16))


@pytest.mark.gpu
def test_more_than_2_pow_31_elements():
    """int64 offsets: a 2.2e9-element bf16 input (4.4 GB), forward and backward. Every channel past the 128th
    starts beyond element 2**31: the last rows against the fp32 reference, dw and db against fp64 sums."""
    x, weight, bias, _ = make_inputs(1, 130, 4096, 4096, torch.bfloat16, residual=False)
    assert x.numel() > 2**31
    x, weight, bias = (t.requires_grad_(True) for t in (x, weight, bias))
    y = dk.rms_norm_2d(x, weight, bias)
    rows = slice(3968, None)
    xs = x.detach()[:, :, rows].float().requires_grad_(True)
    y_ref = reference.rms_norm_2d(xs, weight.detach().float(), bias.detach().float())
    assert_close(y[:, :, rows], y_ref.double(), torch.bfloat16)
    grad = torch.randn_like(y)
    dx, dw, db = torch.autograd.grad(y, (x, weight, bias), grad)
    del y
    (dx_ref,) = torch.autograd.grad(y_ref, xs, grad[:, :, rows].float())
    assert_close(dx[:, :, rows], dx_ref.double(), torch.bfloat16)
    dw_ref, db_ref = (torch.zeros(130, dtype=torch.float64, device="cuda") for _ in range(2))
    for r in range(0, 4096, 256):
        xr, gr = x.detach()[:, :, r:r + 256].double(), grad[:, :, r:r + 256].double()
        dw_ref += (gr * xr * torch.rsqrt(xr.square().mean(1, keepdim=True) + 1e-5)).sum((0, 2, 3))
        db_ref += gr.sum((0, 2, 3))
    assert_close(dw, dw_ref, torch.bfloat16)
    assert_close(db, db_ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True])
def test_opcheck_cuda_full(residual):
    x, weight, bias, res = (t.requires_grad_(True) if t is not None else t
                            for t in make_inputs(2, 64, 9, 13, torch.bfloat16, residual))
    opcheck(torch.ops.dcae.rms_norm_2d.default, (x, weight, bias, 1e-5, res))
    _, rstd = torch.ops.dcae.rms_norm_2d(x, weight, bias, 1e-5, res)
    opcheck(torch.ops.dcae.rms_norm_2d_bwd.default, (torch.randn_like(x), x.detach(), weight.detach(), rstd, 1e-5))


@pytest.mark.gpu
def test_torch_compile_fullgraph_fwd_bwd():
    def block(x, h, w, b):
        return dk.rms_norm_2d(h * 2, w, b, 1e-5, x).float().square().sum() + dk.rms_norm_2d(x, w, b).float().sum()

    x, h = (torch.randn(2, 256, 32, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(256, device="cuda", requires_grad=True) for _ in range(2))
    compiled = torch.compile(block, fullgraph=True)
    y, y_eager = compiled(x, h, w, b), block(x, h, w, b)
    torch.testing.assert_close(y, y_eager)
    for a, e in zip(torch.autograd.grad(y, (x, h, w, b)), torch.autograd.grad(y_eager, (x, h, w, b))):
        torch.testing.assert_close(a, e)


@pytest.mark.gpu
def test_autocast_module_cuda():
    """Under bf16 autocast: bf16 activations with the module's fp32 weight and bias, the residual fused."""
    module = RMSNorm2d(64).cuda()
    x, _, _, res = make_inputs(2, 64, 16, 16, torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = module(x, res)
    assert y.dtype == torch.bfloat16 and module.weight.dtype == torch.float32
    y_ref = reference.rms_norm_2d(x.double(), module.weight.double(), module.bias.double(), 1e-5, res.double())
    assert_close(y, y_ref, torch.bfloat16)
