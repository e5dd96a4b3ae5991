"""ReLU linear attention, bf16: Triton vs the eager (diffusers) formulation vs torch.compile of it."""
import pytest
import torch

import dcae_kernels
from dcae_kernels import reference

from .common import bench_marks, compiled, grad_fn, measure, nbytes, timed_call

pytestmark = bench_marks

# DC-AE's interleaved qkv, head_dim 32, (B, heads, H, W) as in anchors-gpu.md; DiT token layout (B, N, heads, d).
NCHW = [(8, 32, 128, 128), (8, 64, 64, 64), (8, 64, 32, 32), (2, 32, 256, 256)]
TOKENS = [(8, n, 16, d) for d in (64, 32) for n in (256, 1024, 4096)]
CASES = [("relu_linear_attention", s) for s in NCHW] + [("relu_linear_attention_tokens", s) for s in TOKENS]
MODES = [(p, m) for p in ("triton", "eager", "compile") for m in ("fwd", "fwd+bwd")] + [("triton", "bwd")]
_compiled = {}


def implementation(op: str, provider: str):
    if provider == "triton":
        return getattr(dcae_kernels, op)
    if provider == "compile":
        return _compiled.setdefault(op, compiled(getattr(reference, op)))
    return getattr(reference, op)


def inputs_for(op: str, shape: tuple) -> tuple[list[torch.Tensor], str, int]:
    """Random bf16 inputs, the shape label and B*heads*N*d (elements of one of q, k, v, out)."""
    if op == "relu_linear_attention":
        batch, heads, height, width = shape
        qkv = torch.randn(batch, heads * 96, height, width, device="cuda", dtype=torch.bfloat16)
        return [qkv], f"B{batch} heads{heads} d32 N{height * width}", qkv.numel() // 3
    batch, n, heads, d = shape
    qkv = [torch.randn(batch, n, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    return qkv, f"B{batch} N{n} heads{heads} d{d}", qkv[0].numel()


@pytest.mark.parametrize("provider,mode", MODES)
@pytest.mark.parametrize("op,shape", CASES, ids=[f"{op}-{'x'.join(map(str, s))}" for op, s in CASES])
def test_relu_linear_attention(benchmark, op, shape, provider, mode):
    inputs, label, elements = inputs_for(op, shape)
    d = 32 if op == "relu_linear_attention" else shape[-1]
    fn = implementation(op, provider)
    y = fn(*inputs)
    fwd_bytes = nbytes(*inputs, y)
    bwd_bytes = 2 * nbytes(*inputs) + nbytes(y)  # read q, k, v and dout; write dq, dk, dv
    fwd_flops = 4 * (d + 1) * elements  # [v; 1] k^T and its product with q: 2 * 2 (d+1) d N per head
    if mode == "fwd":
        run, total, flops = (lambda: fn(*inputs)), fwd_bytes, fwd_flops
    else:
        for t in inputs:
            t.requires_grad_(True)
        grad = torch.randn_like(y)
        if mode == "fwd+bwd":  # the backward has twice the forward's products
            run, total, flops = grad_fn(fn, inputs, grad), fwd_bytes + bwd_bytes, 3 * fwd_flops
        else:
            y = fn(*inputs)
            run, total, flops = ((lambda: torch.autograd.grad(y, inputs, grad, retain_graph=True)), bwd_bytes,
                                 2 * fwd_flops)
    measure(benchmark, run, kernel=op, provider=provider, mode=mode, shape=label, nbytes=total, flops=flops)


# The split form tiled inference runs (dcae tiling): the state of a whole image, then apply to (a region of) it.
@pytest.mark.parametrize("provider", ["triton", "eager", "compile"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", ["relu_linear_attention_state", "relu_linear_attention_apply"])
def test_state_and_apply(benchmark, op, mode, provider):
    batch, heads, height, width = NCHW[0]
    qkv = torch.randn(batch, heads * 96, height, width, device="cuda", dtype=torch.bfloat16)
    state = reference.relu_linear_attention_state(qkv, 32)
    third = nbytes(qkv) // 3  # bytes of one of q, k, v
    if op == "relu_linear_attention_state":  # read k, v, write the state; back: read k, v, dS, write dqkv
        inputs, fwd_bytes, bwd_bytes = [qkv], 2 * third + nbytes(state), 5 * third + nbytes(state)
    else:  # read q and the state, write out; back: read q, dout, the state, write dqkv and dS
        inputs, fwd_bytes, bwd_bytes = [qkv, state], 2 * third + nbytes(state), 5 * third + 2 * nbytes(state)
    run, total = timed_call(implementation(op, provider), inputs, mode, fwd_bytes, bwd_bytes)
    measure(benchmark, run, kernel=op, provider=provider, mode=mode,
            shape=f"B{batch} heads{heads} d32 N{height * width}", nbytes=total)
