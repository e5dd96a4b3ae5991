"""RMSNorm2d (+ residual add), bf16: Triton vs the model's former eager RMSNorm2d + add vs torch.compile of it."""
import pytest
import torch

import dcae_kernels

from .common import bench_marks, compiled, measure, nbytes, timed_call

pytestmark = bench_marks

# (B, C, H, W) of DC-AE's RMSNorm2d inputs: f32c32 stages at 512 px (B8) and the first stage at 1024 px (B2)
SHAPES = [(8, 256, 256, 256), (8, 512, 128, 128), (8, 1024, 32, 32), (2, 128, 1024, 1024)]
MODES = [(p, m) for p in ("triton", "eager", "compile") for m in ("fwd", "fwd+bwd")] + [("triton", "bwd")]
_compiled = {}


def eager(x, weight, bias, eps=1e-5, residual=None):
    """The model's RMSNorm2d before the fused op (fp32 math, rounded to x's dtype), then the block's add."""
    h = x.float()
    h = h * torch.rsqrt(h.square().mean(1, keepdim=True) + eps)
    h = (h * weight.float()[:, None, None] + bias.float()[:, None, None]).to(x.dtype)
    return h if residual is None else residual + h


def implementation(provider: str):
    if provider == "triton":
        return dcae_kernels.rms_norm_2d
    if provider == "compile":
        return _compiled.setdefault("eager", compiled(eager))
    return eager


@pytest.mark.parametrize("provider,mode", MODES)
@pytest.mark.parametrize("add", [False, True], ids=["", "add"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_rms_norm_2d(benchmark, shape, add, provider, mode):
    batch, channels, height, width = shape
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    weight, bias = (torch.randn(channels, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    res = torch.randn_like(x) if add else None
    fn = implementation(provider)
    inputs = [t for t in (x, weight, bias, res) if t is not None]
    call = lambda *t: fn(t[0], t[1], t[2], 1e-5, t[3] if add else None)  # noqa: E731
    y = call(*inputs)
    fwd_bytes = nbytes(*inputs, y)
    bwd_bytes = nbytes(y, x, x, weight, bias)  # read dy and x, write dx, dw, db; d(residual) = dy is passed through
    run, total = timed_call(call, inputs, mode, fwd_bytes, bwd_bytes)
    measure(benchmark, run, kernel="rms_norm_2d" + ("+add" if add else ""), provider=provider, mode=mode,
            shape=f"B{batch} C{channels} {height}x{width}", nbytes=total)
