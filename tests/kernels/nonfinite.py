"""NaN and Inf propagate through an op exactly as through its reference, forward and backward."""
import torch

SPECIALS = (float("nan"), float("inf"), float("-inf"))


def plant(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    """A copy of ``t`` with ``value`` at ``index``."""
    t = t.clone()
    t[index] = value
    return t


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float) -> None:
    """Same shape, NaN exactly where expected has NaN, +-Inf where it has +-Inf, and the finite values within
    ``rtol`` of expected's largest finite magnitude."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    for name, mask in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        got, want = mask(actual), mask(expected)
        assert torch.equal(got, want), (f"{what}: {name} at {got.sum().item()} elements, the reference at "
                                        f"{want.sum().item()}; first difference at "
                                        f"{tuple((got != want).nonzero()[0].tolist())}")
    finite = expected.isfinite()
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    torch.testing.assert_close(actual[finite].double(), expected[finite].double(), rtol=rtol,
                               atol=rtol * scale + 1e-30, msg=lambda m: f"{what}: {m}")


def check_nonfinite_like_reference(fn, ref, inputs: list[torch.Tensor], rtol: float) -> None:
    """fn(*inputs) and ref(*inputs) (inputs with planted NaN / Inf), and the gradients of every input for one
    finite output gradient, agree: see `assert_same_nonfinite`."""
    def run(f, grad=None):
        xs = [t.detach().clone().requires_grad_(True) for t in inputs]
        y = f(*xs)
        grad = torch.randn_like(y) if grad is None else grad
        return y.detach(), torch.autograd.grad(y, xs, grad), grad

    y, grads, grad = run(fn)
    y_ref, grads_ref, _ = run(ref, grad)
    assert_same_nonfinite(y, y_ref, "output", rtol)
    for i, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        assert_same_nonfinite(g, g_ref, f"gradient of input {i}", rtol)
