"""Shortcut ops, bf16: Triton vs the eager reference vs torch.compile(reference) vs hand-written CUDA C++."""
import pytest
import torch

import dcae_kernels
from dcae_kernels import reference

from . import cuda_shortcut
from .common import bench_marks, compiled, measure, nbytes, timed_call

pytestmark = bench_marks

# (B, C_in, H_in, W_in, C_out), as in anchors-gpu.md
SHAPES = {
    "space_to_channel_avg": [(8, 256, 512, 512, 512), (8, 512, 256, 256, 512), (8, 512, 128, 128, 1024)],
    "channel_to_space_dup": [(8, 512, 256, 256, 256), (8, 512, 128, 128, 512), (8, 1024, 64, 64, 512)],
}
CASES = [(op, shape) for op, shapes in SHAPES.items() for shape in shapes]
_compiled = {}


def implementation(op: str, provider: str):
    if provider == "triton":
        return getattr(dcae_kernels, op)
    if provider == "cuda":
        return getattr(cuda_shortcut, op)
    if provider == "compile":
        return _compiled.setdefault(op, compiled(getattr(reference, op)))
    return getattr(reference, op)


@pytest.mark.parametrize("provider,mode", [(p, m) for p in ("triton", "eager", "compile", "cuda")
                                           for m in ("fwd", "fwd+bwd")] + [("triton", "bwd")])
@pytest.mark.parametrize("add", [False, True], ids=["", "add"])
@pytest.mark.parametrize("op,shape", CASES, ids=[f"{op}-{'x'.join(map(str, s))}" for op, s in CASES])
def test_shortcut(benchmark, op, shape, add, provider, mode):
    batch, c_in, height, width, c_out = shape
    factor = 2
    x = torch.randn(batch, c_in, height, width, device="cuda", dtype=torch.bfloat16)
    out_hw = (height // factor, width // factor) if op == "space_to_channel_avg" else (height * factor,
                                                                                       width * factor)
    res = torch.randn(batch, c_out, *out_hw, device="cuda", dtype=torch.bfloat16) if add else None
    fn = implementation(op, provider)
    inputs = [t for t in (x, res) if t is not None]
    call = lambda *t: fn(t[0], c_out, factor, t[1] if add else None)  # noqa: E731
    y = call(*inputs)
    fwd_bytes = nbytes(x, y, *([res] if add else []))
    bwd_bytes = nbytes(y, x)  # read dy, write dx; d(residual) = dy is passed through
    run, total = timed_call(call, inputs, mode, fwd_bytes, bwd_bytes)
    measure(benchmark, run, kernel=op + ("+add" if add else ""), provider=provider, mode=mode,
            shape=f"B{batch} C{c_in} {height}x{width} -> C{c_out}", nbytes=total)
