"""adaLN-Zero's modulated LayerNorm (+ the gated residual add before it), bf16: Triton vs DiT's unfused eager
torch sequence vs torch.compile of it."""
import pytest
import torch

import dcae_kernels

from .common import bench_marks, compiled, measure, nbytes

pytestmark = bench_marks

# (B, N, C) of DiT-XL/2's tokens: 256 px (32x32 latents, patch 2) at B32 and 512 px at B8
SHAPES = [(32, 256, 1152), (8, 1024, 1152)]
MODES = [(p, m) for p in ("triton", "eager", "compile") for m in ("fwd", "fwd+bwd")] + [("triton", "bwd")]
_compiled = {}


def eager(x, shift, scale, eps=1e-6, residual=None, gate=None):
    """DiT's unfused step: h = residual + gate * x, then LayerNorm without affine weights, modulated."""
    h = x if residual is None else residual + (x if gate is None else gate[:, None] * x)
    y = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=eps) * (1 + scale[:, None]) + shift[:, None]
    return y, h


def implementation(provider: str):
    if provider == "triton":
        return dcae_kernels.modulated_layer_norm
    if provider == "compile":
        return _compiled.setdefault("eager", compiled(eager))
    return eager


def timed_call(call, inputs, mode: str, fwd_bytes: int, bwd_bytes: int):
    """As common.timed_call, for a call returning several outputs, each given an upstream gradient."""
    if mode == "fwd":
        return (lambda: call(*inputs)), fwd_bytes
    for t in inputs:
        t.requires_grad_(True)
    outputs = call(*inputs)
    grads = [torch.randn_like(t) for t in outputs]
    if mode == "fwd+bwd":
        return (lambda: torch.autograd.grad(call(*inputs), inputs, grads)), fwd_bytes + bwd_bytes
    return (lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)), bwd_bytes


@pytest.mark.parametrize("provider,mode", MODES)
@pytest.mark.parametrize("gated", [False, True], ids=["", "gated-add"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_modulated_layer_norm(benchmark, shape, gated, provider, mode):
    """gated: y, h = norm(residual + gate * x), both differentiated (h is the running residual stream); else the
    block's first norm, y = norm(x), y differentiated."""
    batch, tokens, channels = shape
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    shift, scale, gate = (0.1 * torch.randn(batch, channels, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    res = torch.randn_like(x) if gated else None
    fn = implementation(provider)
    inputs = [t for t in (x, shift, scale, res, gate if gated else None) if t is not None]
    if gated:
        call = lambda *t: fn(t[0], t[1], t[2], 1e-6, t[3], t[4])  # noqa: E731
    else:
        call = lambda *t: fn(t[0], t[1], t[2], 1e-6)[:1]  # noqa: E731
    outputs = call(*inputs)
    fwd_bytes = nbytes(*inputs, *outputs)
    # read dy (and dh) and the inputs the gradients need, write every input's gradient
    bwd_bytes = nbytes(*outputs, *inputs, *[t for t in inputs if t is not shift])
    run, total = timed_call(call, inputs, mode, fwd_bytes, bwd_bytes)
    measure(benchmark, run, kernel="modulated_layer_norm" + ("+gated_add" if gated else ""), provider=provider,
            mode=mode, shape=f"B{batch} N{tokens} C{channels}", nbytes=total)
