"""modulated_layer_norm (adaLN-Zero's gated residual add + modulated LayerNorm) against the fp64 reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import dcae_kernels as dk
from dcae_kernels import modulated_norm, reference

from .allocations import record_allocations
from .device import DEVICE, OPCHECK_UTILS
from .nonfinite import SPECIALS, check_nonfinite_like_reference, plant

# Relative to the largest reference magnitude: fp32 accumulation; fp16 / bf16 outputs rounded once.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-6


def make_inputs(batch, tokens, channels, dtype, residual=True, gate=True, mod_dtype=None, layout="contiguous",
                device=DEVICE):
    """x (in ``layout``), shift, scale (as chunks of one (B, 3C) adaLN projection, in ``mod_dtype``, default x's),
    the residual and the gate, or None."""
    x = torch.randn(batch, tokens, channels, device=device)
    if layout == "strided":  # every other channel of a wider tensor
        x = torch.randn(batch, tokens, 2 * channels, device=device)[..., ::2]
    elif layout == "transposed":
        x = torch.randn(batch, channels, tokens, device=device).transpose(1, 2)
    mod = torch.randn(batch, 3 * channels, device=device).to(mod_dtype or dtype)
    shift, scale, gate_ = (0.5 * mod).tensor_split(3, dim=1)
    res = torch.randn(batch, tokens, channels, device=device).to(dtype) if residual else None
    return x.to(dtype), shift, scale, res, 2 * gate_ if residual and gate else None


def assert_close(actual, expected, dtype, eager=None, scale=0.0):
    """actual ~ expected (fp64) within TOL of the larger of expected's largest magnitude and ``scale`` (that of the
    terms a result is the difference of), plus 4x the error of ``eager`` (the reference run in the inputs' dtypes)
    and the dtype's subnormal spacing."""
    tol, info = TOL[dtype], torch.finfo(dtype)
    atol = tol * max(expected.abs().max().item() if expected.numel() else 0.0, scale) + info.tiny * info.eps
    if eager is not None:
        atol += 4 * (eager.double() - expected).abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=atol)


def check_against_reference(x, shift, scale, res, gate, eps=EPS, outputs=("y", "h")):
    """Both outputs and the gradients of every input, for upstream gradients of the ``outputs`` named (the others
    unused), equal the reference run in fp64 on the same values, as closely as the reference run in the inputs'
    dtypes does."""
    inputs = [t for t in (x, shift, scale, res, gate) if t is not None]

    def run(fn, cast, grads=None):
        xs = [None if t is None else cast(t.detach()).requires_grad_(True) for t in (x, shift, scale, res, gate)]
        y, h = fn(xs[0], xs[1], xs[2], eps, xs[3], xs[4])
        leaves = [t for t in xs if t is not None]
        used = [t for t, name in zip((y, h), ("y", "h")) if name in outputs]
        grads = [torch.randn_like(t) for t in used] if grads is None else [g.to(t.dtype) for g, t in zip(grads, used)]
        d = torch.autograd.grad(used, leaves, grads, allow_unused=True)
        return (y, h), [torch.zeros_like(t) if g is None else g for g, t in zip(d, leaves)], grads

    out, grads, upstream = run(dk.modulated_layer_norm, lambda t: t)
    out_ref, grads_ref, _ = run(reference.modulated_layer_norm, torch.Tensor.double, upstream)
    out_eager, grads_eager, _ = run(reference.modulated_layer_norm, lambda t: t, upstream)
    for t, t_ref, t_eager in zip(out, out_ref, out_eager):
        assert t.dtype == x.dtype and t.shape == x.shape
        assert_close(t, t_ref, x.dtype, t_eager)
    assert out[0].is_contiguous() and (res is None or out[1].is_contiguous())  # no residual: h is x (test_semantics)
    # dh_total = dh + rstd * (u - mean_c(u)) cancels to ~0 where C is small: at most rstd * |g| in size
    h64 = out_ref[1]
    rstd = torch.rsqrt(h64.var(-1, unbiased=False, keepdim=True) + eps)
    dx_scale = (rstd * (1 + scale.double().abs()[:, None])).max().item() * (upstream[0].abs().max().item()
                                                                            if "y" in outputs else 0.0)
    for t, g, g_ref, g_eager in zip(inputs, grads, grads_ref, grads_eager):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_close(g, g_ref, t.dtype, g_eager, dx_scale * (g.dim() == 3))
    return out, grads


@st.composite
def cases(draw, dtypes):
    dtype = draw(st.sampled_from(dtypes))
    torch.manual_seed(draw(st.integers(0, 2**16)))  # the random values are part of the example
    residual = draw(st.booleans())
    return dict(batch=draw(st.integers(1, 3)), tokens=draw(st.integers(1, 12)),
                channels=draw(st.one_of(st.sampled_from([1, 2, 17, 64, 130]), st.integers(1, 40))), dtype=dtype,
                residual=residual, gate=residual and draw(st.booleans()),
                mod_dtype=draw(st.sampled_from([dtype, torch.float32])),
                layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])))


# bf16 runs under the interpreter too (no tl.dot here); its rounding there is coarser than a GPU's.
@settings(max_examples=15)
@given(case=cases([torch.float32, torch.float16, torch.bfloat16]),
       outputs=st.sampled_from([("y", "h"), ("y", "h"), ("y",), ("h",)]))
def test_matches_reference(case, outputs):
    check_against_reference(*make_inputs(**case), outputs=outputs)


# Under the interpreter a forward tile holds 512 elements (rows of up to 256 channels share it) and a backward
# tile 256; the backward's programs take chunks of tokens (several per sample, the last partial).
@pytest.mark.parametrize("channels", [1, 16, 33, 300])
def test_channel_counts(channels):
    check_against_reference(*make_inputs(2, 21, channels, torch.float32))


@pytest.mark.parametrize("residual, gate", [(True, True), (True, False), (False, False)])
def test_gradcheck_float64(residual, gate):
    """Numerical gradients of the fp64 kernels (the interpreter runs them; a GPU runs the reference for fp64)
    through both outputs."""
    inputs = [t.requires_grad_(True) for t in make_inputs(2, 5, 7, torch.float64, residual, gate) if t is not None]

    def fn(x, shift, scale, *rest):
        return dk.modulated_layer_norm(x, shift, scale, EPS, *rest)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_semantics():
    """h = residual + gate * x; no gate: gate = 1; no residual: h is x itself; y = LayerNorm(h) * (1 + scale)
    + shift."""
    x, shift, scale, res, gate = make_inputs(2, 3, 8, torch.float32)
    ln = torch.nn.functional.layer_norm
    y, h = dk.modulated_layer_norm(x, shift, scale, EPS, res, gate)
    torch.testing.assert_close(h, res + gate[:, None] * x)
    torch.testing.assert_close(y, ln(h, (8,), eps=EPS) * (1 + scale[:, None]) + shift[:, None])
    y, h = dk.modulated_layer_norm(x, shift, scale, EPS, res)
    torch.testing.assert_close(h, res + x)
    torch.testing.assert_close(y, ln(res + x, (8,), eps=EPS) * (1 + scale[:, None]) + shift[:, None])
    y, h = dk.modulated_layer_norm(x, shift, scale)
    assert h is x
    torch.testing.assert_close(y, ln(x, (8,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None])


def test_float64_is_exact():
    """fp64 runs with an fp64 eps (not rounded through fp32): equal to the fp64 reference to fp64 rounding. A large
    eps makes an fp32-rounded one show."""
    x, shift, scale, res, gate = make_inputs(2, 3, 8, torch.float64)
    eps = 0.1 + 1e-12
    for got, want in zip(dk.modulated_layer_norm(x, shift, scale, eps, res, gate),
                         reference.modulated_layer_norm(x, shift, scale, eps, res, gate)):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_zero_modulation_is_plain_layer_norm():
    """adaLN-Zero's initial state: shift = scale = 0 (gate = 0 leaves h the residual)."""
    x, shift, _, res, _ = make_inputs(2, 4, 12, torch.float32)
    zero = torch.zeros_like(shift)
    y, h = dk.modulated_layer_norm(x, zero, zero, EPS, res, zero)
    assert torch.equal(h, res)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(res, (12,), eps=EPS))


def test_extreme_magnitudes():
    """Large, tiny and constant rows: rstd saturates at rsqrt(eps), gradients stay finite."""
    x, shift, scale, res, gate = make_inputs(1, 6, 8, torch.float32)
    res[:, 0] *= 1e4
    res[:, 1] *= 1e-4
    x[:, 2], res[:, 2] = 0, 3
    (y, _), grads = check_against_reference(x, shift, scale, res, gate, eps=1e-3)
    assert all(g.isfinite().all() for g in grads)
    torch.testing.assert_close(y[0, 2], shift[0])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on inf - inf, 0 * inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("where", ["x", "shift", "scale", "residual", "gate"])
def test_nonfinite_like_reference(dtype, where):
    """NaN / +Inf / -Inf planted in one input (one per sample, samples 0-2; sample 3 finite) give NaN and Inf at
    exactly the reference's elements, forward (y and h) and backward."""
    torch.manual_seed(0)
    names = ("x", "shift", "scale", "residual", "gate")
    inputs = dict(zip(names, make_inputs(4, 5, 12, dtype)))
    for b, value in enumerate(SPECIALS):
        index = (b, 1 + b, 3 + b) if inputs[where].dim() == 3 else (b, 3 + b)
        inputs[where] = plant(inputs[where], index, value)

    def stacked(op):
        return lambda x, shift, scale, res, gate: torch.stack(op(x, shift, scale, EPS, res, gate))

    check_nonfinite_like_reference(stacked(dk.modulated_layer_norm), stacked(reference.modulated_layer_norm),
                                   [inputs[n] for n in names], TOL[dtype])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) on 1 / 0, 0 * inf
def test_eps_zero_on_a_constant_row():
    """eps = 0 is allowed (checks.check_eps): a constant row has rstd = inf and gives NaN, as in the reference."""
    x, shift, scale, res, gate = make_inputs(2, 3, 8, torch.float32)
    x[0, 1], res[0, 1] = 0, 0
    y, _ = dk.modulated_layer_norm(x, shift, scale, 0.0, res, gate)
    y_ref, _ = reference.modulated_layer_norm(x, shift, scale, 0.0, res, gate)
    assert y[0, 1].isnan().all() and torch.equal(y.isnan(), y_ref.isnan())


@pytest.fixture
def allocations(monkeypatch):
    """Shapes of the outputs the op allocates (NaN-poisoned by conftest's fixture)."""
    return record_allocations(monkeypatch, modulated_norm)


def test_every_output_is_written(allocations):
    """y, h, mean, rstd, dh_total, dx and the partial sums start as NaN: every element the kernels skip would
    show."""
    check_against_reference(*make_inputs(2, 23, 40, torch.float32))
    check_against_reference(*make_inputs(3, 9, 100, torch.float32, gate=False))
    assert {(2, 23, 40), (2, 23), (3, 9, 100), (3, 9)} <= set(allocations)
    # (3 with a gate, B, programs per sample, C) partials: several programs per sample
    assert any(len(s) == 4 and s[:2] == (3, 2) and s[2] > 1 and s[3] == 40 for s in allocations)
    assert any(len(s) == 4 and s[:2] == (2, 3) and s[3] == 100 for s in allocations)


def test_programs_stay_within_a_sample():
    """Samples with very different values: the per-sample sums (dshift, dscale, dgate) of each equal its own."""
    x, shift, scale, res, gate = make_inputs(3, 19, 6, torch.float32)
    x[1] *= 100
    res[2] += 50
    inputs = [t.requires_grad_(True) for t in (x, shift, scale, res, gate)]
    y, h = dk.modulated_layer_norm(x, shift, scale, EPS, res, gate)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y, h), inputs, (dy, dh))
    for b in range(3):
        one = [t[b:b + 1].detach().requires_grad_(True) for t in inputs]
        y1, h1 = reference.modulated_layer_norm(one[0], one[1], one[2], EPS, one[3], one[4])
        g1 = torch.autograd.grad((y1, h1), one, (dy[b:b + 1], dh[b:b + 1]))
        for g, g_one in zip(grads, g1):
            torch.testing.assert_close(g[b:b + 1], g_one, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape, dtype", [((2, 40, 24), torch.float32),
                                          pytest.param((32, 256, 1152), torch.bfloat16, marks=pytest.mark.gpu)])
def test_deterministic(shape, dtype):
    """dshift, dscale and dgate are per-program partials summed by torch in a fixed order: runs agree bit for
    bit."""
    inputs = [t.requires_grad_(True) for t in make_inputs(*shape, dtype)]
    x, shift, scale, res, gate = inputs
    grads = [torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(2)]
    runs = [(*(out := dk.modulated_layer_norm(x, shift, scale, EPS, res, gate)),
             *torch.autograd.grad(out, inputs, grads)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_only_some_inputs_need_grad():
    x, shift, scale, res, gate = make_inputs(2, 3, 6, torch.float32)
    scale.requires_grad_(True)
    y, _ = dk.modulated_layer_norm(x, shift, scale, EPS, res, gate)
    (g,) = torch.autograd.grad(y.sum(), scale)
    h = res + gate[:, None] * x
    torch.testing.assert_close(g, torch.nn.functional.layer_norm(h, (6,), eps=EPS).sum(1))


def test_h_alone_is_the_gated_residual_add():
    """Only h used downstream: d(residual) = dh, dx = gate * dh, dgate = sum_n dh * x, no shift / scale
    gradient."""
    x, shift, scale, res, gate = (t.requires_grad_(True) for t in make_inputs(2, 5, 6, torch.float32))
    _, h = dk.modulated_layer_norm(x, shift, scale, EPS, res, gate)
    dh = torch.randn_like(h)
    dx, dres, dgate, dscale = torch.autograd.grad(h, (x, res, gate, scale), dh, allow_unused=True)
    assert torch.equal(dres, dh) and (dscale is None or not dscale.any())
    torch.testing.assert_close(dx, gate.detach()[:, None] * dh)
    torch.testing.assert_close(dgate, (dh * x.detach()).sum(1))


def test_empty_inputs_launch_nothing(monkeypatch):
    monkeypatch.setattr(modulated_norm, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched"))
    for shape in ((0, 4, 3), (2, 0, 3), (2, 4, 0)):
        inputs = [t.requires_grad_(True) for t in make_inputs(*shape, torch.float32)]
        y, h = dk.modulated_layer_norm(inputs[0], inputs[1], inputs[2], EPS, inputs[3], inputs[4])
        assert y.shape == h.shape == shape and y.dtype == torch.float32
        grads = torch.autograd.grad((y, h), inputs, (torch.ones_like(y), torch.ones_like(h)))
        assert [g.shape for g in grads] == [t.shape for t in inputs]
        assert all(g.eq(0).all() for g in grads[1:3]) and grads[4].eq(0).all()


def test_wide_rows_run_the_reference(monkeypatch):
    """Rows wider than MAX_CHANNELS (more than the kernels hold in registers) run the reference."""
    monkeypatch.setattr(modulated_norm, "MAX_CHANNELS", 8)
    monkeypatch.setattr(modulated_norm, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched"))
    x, shift, scale, res, gate = make_inputs(1, 2, 9, torch.float32)
    out = dk.modulated_layer_norm(x, shift, scale, EPS, res, gate)
    for t, t_ref in zip(out, reference.modulated_layer_norm(x, shift, scale, EPS, res, gate)):
        assert torch.equal(t, t_ref)


@pytest.mark.parametrize("residual, gate", [(True, True), (True, False), (False, False)])
def test_opcheck(residual, gate):
    x, shift, scale, res, g = (t.requires_grad_(True) if t is not None else t
                               for t in make_inputs(2, 5, 6, torch.float32, residual, gate))
    opcheck(torch.ops.dcae.modulated_layer_norm.default, (x, shift, scale, EPS, res, g), test_utils=OPCHECK_UTILS)


@pytest.mark.parametrize("grads", ["both", "y", "h"])
def test_opcheck_backward_op(grads):
    x, shift, scale, res, gate = make_inputs(2, 5, 6, torch.float32)
    _, _, mean, rstd = torch.ops.dcae.modulated_layer_norm(x, shift, scale, EPS, res, gate)
    dy = torch.randn_like(x) if grads in ("both", "y") else None
    dh = torch.randn_like(x) if grads in ("both", "h") else None
    opcheck(torch.ops.dcae.modulated_layer_norm_bwd.default, (dy, dh, x, scale, mean, rstd, res, gate),
            test_utils=OPCHECK_UTILS)


def test_op_returns_statistics():
    x, shift, scale, res, gate = make_inputs(2, 6, 10, torch.float16)
    y, h, mean, rstd = torch.ops.dcae.modulated_layer_norm(x, shift, scale, EPS, res, gate)
    assert mean.shape == rstd.shape == (2, 6) and mean.dtype == rstd.dtype == torch.float32
    assert not mean.requires_grad
    h64 = res.double() + gate.double()[:, None] * x.double()
    torch.testing.assert_close(mean.double(), h64.mean(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rstd.double(), torch.rsqrt(h64.var(-1, unbiased=False) + EPS), rtol=1e-5, atol=0)
    _, h, _, _ = torch.ops.dcae.modulated_layer_norm(x, shift, scale, EPS)
    assert h.numel() == 0  # no residual: the function returns x itself as h


def test_reference_backend(monkeypatch):
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    monkeypatch.setattr(modulated_norm, "wrap_triton", lambda kernel: pytest.fail("a kernel was launched"))
    x, shift, scale, res, gate = make_inputs(1, 4, 6, torch.float32)
    for t, t_ref in zip(dk.modulated_layer_norm(x, shift, scale, EPS, res, gate),
                        reference.modulated_layer_norm(x, shift, scale, EPS, res, gate)):
        assert torch.equal(t, t_ref)


def test_compiles_without_graph_breaks_on_reference(monkeypatch):
    """The dispatch (backend choice, checks) traces under torch.compile(fullgraph=True)."""
    monkeypatch.setenv("DCAE_KERNELS_BACKEND", "reference")
    fn = lambda x, s, r: dk.modulated_layer_norm(x, s, s, EPS, r, s)  # noqa: E731
    x, s, r = torch.randn(2, 4, 8), torch.randn(2, 8), torch.randn(2, 4, 8)
    for t, t_ref in zip(torch.compile(fn, fullgraph=True, backend="eager")(x, s, r), fn(x, s, r)):
        torch.testing.assert_close(t, t_ref)


# ----------------------------------------------------------------------------------------- bad input
X, S = torch.randn(2, 3, 4), torch.randn(2, 4)


class TestBadInput:
    def test_rank_not_3(self):
        with pytest.raises(ValueError, match=r"x must have shape \(B, N, C\)"):
            dk.modulated_layer_norm(torch.randn(2, 3, 4, 1), S, S)

    def test_integer_dtype(self):
        with pytest.raises(TypeError, match="x must be float16, bfloat16, float32 or float64"):
            dk.modulated_layer_norm(X.int(), S, S)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="x must be a torch.Tensor"):
            dk.modulated_layer_norm(X.numpy(), S, S)

    @pytest.mark.parametrize("shape", [(2, 5), (1, 4), (2, 4, 1), (4,)])
    def test_shift_wrong_shape(self, shape):
        with pytest.raises(ValueError, match=r"shift must have shape \(B, C\) = \(2, 4\)"):
            dk.modulated_layer_norm(X, torch.randn(shape), S)

    def test_shift_integer_dtype(self):
        with pytest.raises(TypeError, match="shift must be float16"):
            dk.modulated_layer_norm(X, S.long(), S)

    def test_shift_on_other_device(self):
        with pytest.raises(ValueError, match="shift is on meta but x is on"):
            dk.modulated_layer_norm(X, S.to("meta"), S)

    def test_scale_wrong_shape(self):
        with pytest.raises(ValueError, match=r"scale must have shape \(2, 4\)"):
            dk.modulated_layer_norm(X, S, S[:1])

    def test_scale_dtype_not_shifts(self):
        with pytest.raises(TypeError, match="scale must have shift's dtype"):
            dk.modulated_layer_norm(X, S, S.double())

    def test_scale_on_other_device(self):
        with pytest.raises(ValueError, match="scale is on meta but shift is on"):
            dk.modulated_layer_norm(X, S, S.to("meta"))

    def test_scale_not_a_tensor(self):
        with pytest.raises(TypeError, match="scale must be a torch.Tensor"):
            dk.modulated_layer_norm(X, S, None)

    @pytest.mark.parametrize("eps", [-1e-6, float("inf"), float("nan")])
    def test_eps_not_finite_non_negative(self, eps):
        with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
            dk.modulated_layer_norm(X, S, S, eps)

    def test_eps_not_a_number(self):
        with pytest.raises(TypeError, match="eps must be a float"):
            dk.modulated_layer_norm(X, S, S, "1e-6")

    def test_residual_wrong_shape(self):
        with pytest.raises(ValueError, match=r"residual must have shape \(2, 3, 4\)"):
            dk.modulated_layer_norm(X, S, S, EPS, X[:, :2])

    def test_residual_wrong_dtype(self):
        with pytest.raises(TypeError, match="residual must have x's dtype"):
            dk.modulated_layer_norm(X, S, S, EPS, X.half())

    def test_residual_on_other_device(self):
        with pytest.raises(ValueError, match="residual is on meta but x is on"):
            dk.modulated_layer_norm(X, S, S, EPS, X.to("meta"))

    def test_gate_without_residual(self):
        with pytest.raises(ValueError, match="gate needs a residual"):
            dk.modulated_layer_norm(X, S, S, EPS, None, S)

    def test_gate_wrong_shape(self):
        with pytest.raises(ValueError, match=r"gate must have shape \(2, 4\)"):
            dk.modulated_layer_norm(X, S, S, EPS, X, S.T)

    def test_gate_dtype_not_shifts(self):
        with pytest.raises(TypeError, match="gate must have shift's dtype"):
            dk.modulated_layer_norm(X, S, S, EPS, X, S.half())


# ----------------------------------------------------------------------------------------- sm_90 code
def fwd_spec(dtype, cp, block, num_warps, residual=True, gate=True, mod="bf16", scalar="fp32"):
    ptrs = {"x_ptr": dtype, "res_ptr": dtype, "shift_ptr": mod, "scale_ptr": mod, "gate_ptr": mod, "y_ptr": dtype,
            "h_ptr": dtype, "mean_ptr": "fp32", "rstd_ptr": "fp32"}
    return dict(module="dcae_kernels.modulated_norm", kernel="modulated_layer_norm_fwd_kernel", num_warps=num_warps,
                signature={**{p: f"*{t}" for p, t in ptrs.items()}, "eps": scalar, "N": "i32", "C": "i32"},
                aligned=[*ptrs, "N", "C"], constexprs=dict(CP=cp, HAS_RES=residual, HAS_GATE=gate, BLOCK=block))


def bwd_spec(dtype, cp, block, num_warps, residual=True, gate=True, dy=True, dh=True, mod="bf16"):
    ptrs = {"dy_ptr": dtype, "dh_ptr": dtype, "x_ptr": dtype, "res_ptr": dtype, "scale_ptr": mod, "gate_ptr": mod,
            "mean_ptr": "fp32", "rstd_ptr": "fp32", "dht_ptr": dtype, "dx_ptr": dtype, "part_ptr": "fp32"}
    return dict(module="dcae_kernels.modulated_norm", kernel="modulated_layer_norm_bwd_kernel", num_warps=num_warps,
                signature={**{p: f"*{t}" for p, t in ptrs.items()}, "N": "i32", "C": "i32", "CHUNK": "i32"},
                aligned=[*ptrs, "N", "C", "CHUNK"],
                constexprs=dict(CP=cp, HAS_RES=residual, HAS_GATE=gate, HAS_DY=dy, HAS_DH=dh, BLOCK=block))


# The GPU configs (BLOCK / warps as in norm.FWD_CONFIGS / modulated_norm._BWD_CONFIGS), bf16 with every input, at the
# widest rows each config takes (the autotuner prunes the configs narrower than a row), DiT's 1152 channels
# (CP = 2048) and 16 channels.
FWD_CONFIGS, BWD_CONFIGS = ((4096, 4), (8192, 8), (16384, 16)), ((2048, 4), (4096, 8), (4096, 16))
SM90 = {f"fwd CP{c} {b}/{w}": fwd_spec("bf16", c, b, w) for b, w in FWD_CONFIGS for c in (2048, 4096)}
SM90.update({f"bwd CP{c} {b}/{w}": bwd_spec("bf16", c, b, w) for b, w in BWD_CONFIGS for c in (2048, 4096)
             if b >= c})
SM90.update({
    # 16 channels: the most rows per tile
    "fwd CP16 16384/16": fwd_spec("bf16", 16, 16384, 16),
    "bwd CP16 4096/16": bwd_spec("bf16", 16, 4096, 16),
    # torch.compile (Inductor) passes the Python float eps as an fp64 scalar
    "fwd CP2048 8192/8, fp64 eps (Inductor)": fwd_spec("bf16", 2048, 8192, 8, scalar="fp64"),
    # fp32 modulation (an fp32 adaLN projection) with bf16 tokens
    "fwd CP2048 8192/8, fp32 modulation": fwd_spec("bf16", 2048, 8192, 8, mod="fp32"),
    "bwd CP2048 4096/8, fp32 modulation": bwd_spec("bf16", 2048, 4096, 8, mod="fp32"),
    "fwd CP2048 8192/8 fp32": fwd_spec("fp32", 2048, 8192, 8, mod="fp32"),
    "bwd CP2048 4096/8 fp32": bwd_spec("fp32", 2048, 4096, 8, mod="fp32"),
})


@pytest.mark.parametrize("name", list(SM90))
def test_sm90_compiles_without_spills(sm90, name):
    assert "error" not in sm90[name] and sm90[name]["stack"] == 0, sm90[name]


def vectors_per_tensor(spec: dict) -> int:
    """16-byte accesses per thread to one (B, N, C) tensor per tile."""
    block, warps = spec["constexprs"]["BLOCK"], spec["num_warps"]
    return block // (32 * warps) * (4 if spec["signature"]["x_ptr"] == "*fp32" else 2) // 16


# Every (B, N, C) tensor moves in 16-byte vectors: the forward reads x and res and writes y and h; the backward
# reads dy, dh, x and res and writes dh_total and dx.
@pytest.mark.parametrize("name", [n for n in SM90 if "CP16 " not in n])
def test_sm90_moves_rows_in_16_byte_vectors(sm90, name):
    spec, ops = SM90[name], sm90[name]["global_ops"]
    n, flags = vectors_per_tensor(spec), spec["constexprs"]
    if name.startswith("fwd"):
        loads, stores = n * (1 + flags["HAS_RES"]), n * (1 + flags["HAS_RES"])
    else:
        loads = n * (1 + flags["HAS_RES"] + flags["HAS_DY"] + flags["HAS_DH"])
        stores = n * (1 + flags["HAS_GATE"])
    assert ops.get("ld.global.v4.b32", 0) >= loads and ops.get("st.global.v4.b32", 0) >= stores, ops


# ----------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@settings(max_examples=10)
@given(case=cases([torch.bfloat16, torch.float16, torch.float32]),
       outputs=st.sampled_from([("y", "h"), ("y",), ("h",)]))
def test_matches_reference_cuda(case, outputs):
    check_against_reference(*make_inputs(**case), outputs=outputs)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 256, 1152), (8, 1024, 1152), (4, 256, 768), (2, 4096, 384), (2, 64, 3072),
                                   (2, 33, 4096), (3, 77, 1000)])
def test_dit_shapes_bf16(shape):
    """DiT widths (S/B/XL, Flux's 3072, the widest row the kernels hold), bf16 tokens with bf16 and fp32
    modulation, with a gated residual, an ungated one and none."""
    check_against_reference(*make_inputs(*shape, torch.bfloat16))
    check_against_reference(*make_inputs(*shape, torch.bfloat16, mod_dtype=torch.float32))
    check_against_reference(*make_inputs(*shape, torch.bfloat16, gate=False))
    check_against_reference(*make_inputs(*shape, torch.bfloat16, residual=False))


@pytest.mark.gpu
def test_more_than_2_pow_31_elements():
    """int64 offsets: 2 x 540000 tokens x 2048 channels in bf16 (2.2e9 elements, 4.4 GB a tensor), forward and
    backward. Sample 1's last 4096 tokens lie beyond element 2**31: they against the fp32 reference, its dshift
    against an fp64 sum."""
    x, shift, scale, res, gate = make_inputs(2, 540000, 2048, torch.bfloat16)
    assert x.numel() > 2**31
    inputs = [t.requires_grad_(True) for t in (x, shift, scale, res, gate)]
    y, h = dk.modulated_layer_norm(x, shift, scale, EPS, res, gate)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    rows = slice(-4096, None)
    one = [t.detach()[1:][:, rows].float() if t.dim() == 3 else t.detach()[1:].float() for t in inputs]
    one = [t.requires_grad_(True) for t in one]
    y_ref, h_ref = reference.modulated_layer_norm(one[0], one[1], one[2], EPS, one[3], one[4])
    assert_close(y[1:, rows], y_ref.double(), torch.bfloat16)
    assert_close(h[1:, rows], h_ref.double(), torch.bfloat16)
    dx_ref, dres_ref = torch.autograd.grad(y_ref, (one[0], one[3]), dy[1:, rows].float())
    assert_close(grads[0][1:, rows], dx_ref.double(), torch.bfloat16)
    assert_close(grads[3][1:, rows], dres_ref.double(), torch.bfloat16)
    dshift_ref = torch.zeros(2048, dtype=torch.float64, device="cuda")
    for r in range(0, 540000, 60000):
        dshift_ref += dy[1, r:r + 60000].double().sum(0)
    assert_close(grads[1][1], dshift_ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("residual, gate", [(True, True), (True, False), (False, False)])
def test_opcheck_cuda_full(residual, gate):
    x, shift, scale, res, g = (t.requires_grad_(True) if t is not None else t
                               for t in make_inputs(2, 9, 1152, torch.bfloat16, residual, gate))
    opcheck(torch.ops.dcae.modulated_layer_norm.default, (x, shift, scale, EPS, res, g))
    _, _, mean, rstd = torch.ops.dcae.modulated_layer_norm(x, shift, scale, EPS, res, g)
    detached = [t.detach() if t is not None else t for t in (x, scale, mean, rstd, res, g)]
    opcheck(torch.ops.dcae.modulated_layer_norm_bwd.default, (torch.randn_like(x), torch.randn_like(x), *detached))


@pytest.mark.gpu
def test_torch_compile_fullgraph_fwd_bwd():
    """Two DiT sub-block boundaries: the first norm (no residual), then the gated residual add + norm."""
    def block(x, attn_out, mod):
        shift1, scale1, gate1, shift2, scale2 = mod.chunk(5, dim=1)
        y1, h = dk.modulated_layer_norm(x, shift1, scale1)
        y2, h = dk.modulated_layer_norm(attn_out * y1, shift2, scale2, EPS, h, gate1)
        return y2.float().square().sum() + h.float().sum()

    x, attn_out = (torch.randn(2, 256, 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(2))
    mod = torch.randn(2, 5 * 1152, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    y, y_eager = compiled(x, attn_out, mod), block(x, attn_out, mod)
    torch.testing.assert_close(y, y_eager)
    for a, e in zip(torch.autograd.grad(y, (x, attn_out, mod)), torch.autograd.grad(y_eager, (x, attn_out, mod))):
        torch.testing.assert_close(a, e)
