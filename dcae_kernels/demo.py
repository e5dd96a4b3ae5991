"""``python -m dcae_kernels.demo [--size N] [--dtype D]``: every public op's Triton kernels against its plain-torch
reference on random tensors, forward and backward: do they agree, and how long does each take.

On a CUDA device the kernels run compiled. Without one they run under Triton's interpreter (the real kernel code,
executed with numpy on the CPU: slow, so the default sizes are small), which must be chosen before triton is
imported, that is before dcae_kernels is: this module then runs itself again in a fresh process with
TRITON_INTERPRET=1. It refuses to run (exit status 2) where the Triton kernels cannot run at all, or where
DCAE_KERNELS_BACKEND=reference asks for the reference: it would only compare the reference with itself.
Exit status 0 when every op agrees with its reference, 1 otherwise.

To cover a new op, add a `Case` to `cases()`: a name, the op's name (the same in dcae_kernels and in
dcae_kernels.reference), how to call it on the case's tensors, and the tensors (all differentiated).
"""
import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

import dcae_kernels as dk
from dcae_kernels import reference
from dcae_kernels.backend import HAS_TRITON, INTERPRET, backend, requested, triton_blocker

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Largest |ours - reference| / largest |reference| counted as agreeing: forward and each gradient.
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass
class Case:
    name: str
    op: str  # the function's name in dcae_kernels and in dcae_kernels.reference
    call: Callable  # call(fn, *inputs) -> a tensor or a tuple of tensors
    inputs: tuple  # tensors: the gradient of every one is compared


def cases(size: int, channels: int, dtype: torch.dtype) -> list[Case]:
    """One or two calls per public op; ``size`` = the high-resolution side, ``channels`` = the narrow side's
    channel count (attention: heads of min(32, channels), channels // 32 of them or one)."""
    def rand(*shape, dt=dtype):
        return torch.randn(*shape, device=DEVICE, dtype=dt)

    c, half, n = channels, size // 2, size * size // 4
    d, heads = min(32, c), max(1, c // 32)
    x, down_res, up_in = rand(2, c, size, size), rand(2, 2 * c, half, half), rand(2, 2 * c, half, half)
    qkv = rand(2, heads * 3 * d, half, half)
    q, k, v = (rand(2, n, heads, d) for _ in range(3))
    state = reference.relu_linear_attention_state(rand(2, heads * 3 * d, size, half), d)  # of a larger region
    tokens_state = reference.relu_linear_attention_tokens_state(rand(2, 2 * n, heads, d), rand(2, 2 * n, heads, d))
    weight, bias = 1 + 0.1 * rand(2 * c, dt=torch.float32), 0.1 * rand(2 * c, dt=torch.float32)
    tokens, shift, scale, gate = rand(2, n, 2 * c), rand(2, 2 * c), 0.1 * rand(2, 2 * c), rand(2, 2 * c)
    return [
        Case(f"space_to_channel_avg {c}->{2 * c}", "space_to_channel_avg", lambda f, x: f(x, 2 * c, 2), (x,)),
        Case(f"space_to_channel_avg +add {c}->{2 * c}", "space_to_channel_avg", lambda f, x, r: f(x, 2 * c, 2, r),
             (x, down_res)),
        Case(f"channel_to_space_dup {2 * c}->{c}", "channel_to_space_dup", lambda f, x: f(x, c, 2), (up_in,)),
        Case(f"channel_to_space_dup +add {2 * c}->{c}", "channel_to_space_dup", lambda f, x, r: f(x, c, 2, r),
             (up_in, x)),
        Case(f"relu_linear_attention {heads}x d{d}", "relu_linear_attention", lambda f, t: f(t, d), (qkv,)),
        Case(f"relu_linear_attention_state {heads}x d{d}", "relu_linear_attention_state", lambda f, t: f(t, d),
             (qkv,)),
        Case(f"relu_linear_attention_apply {heads}x d{d}", "relu_linear_attention_apply",
             lambda f, t, s: f(t, s, d), (qkv, state)),
        Case(f"relu_linear_attention_tokens {heads}x d{d}", "relu_linear_attention_tokens", lambda f, *t: f(*t),
             (q, k, v)),
        Case("relu_linear_attention_tokens_state", "relu_linear_attention_tokens_state", lambda f, *t: f(*t),
             (k, v)),
        Case("relu_linear_attention_tokens_apply", "relu_linear_attention_tokens_apply", lambda f, *t: f(*t),
             (q, tokens_state)),
        Case(f"rms_norm_2d +add C{2 * c}, fp32 weights", "rms_norm_2d", lambda f, x, w, b, r: f(x, w, b, 1e-5, r),
             (up_in, weight, bias, down_res)),
        Case(f"modulated_layer_norm +gated add C{2 * c}", "modulated_layer_norm",
             lambda f, x, sh, sc, r, g: f(x, sh, sc, 1e-6, r, g), (tokens, shift, scale, rand(2, n, 2 * c), gate)),
    ]


def timed(fn, repeats: int):
    """(result, median seconds) of fn(), after one untimed call on CUDA (compiles and autotunes)."""
    if CUDA:
        fn()
    times, out = [], None
    for _ in range(repeats):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def forward_backward(fn, case: Case, grads_out=None):
    """(outputs, gradients of every input, the output gradients used; random unless given)."""
    leaves = [t.detach().requires_grad_(True) for t in case.inputs]
    out = case.call(fn, *leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads_out = grads_out or [torch.randn_like(o) for o in outs]
    return [o.detach() for o in outs], torch.autograd.grad(outs, leaves, grads_out), grads_out


def relative_diff(ours, theirs) -> float:
    """The worst over the pairs of largest |ours - theirs| / largest |theirs|."""
    return max((a.double() - b.double()).abs().max().item() / (b.abs().max().item() or 1.0)
               for a, b in zip(ours, theirs))


def run(size: int, channels: int, dtype: torch.dtype) -> int:
    repeats = 5 if CUDA else 1
    where = f"compiled, CUDA {torch.cuda.get_device_name()}" if CUDA else "under Triton's interpreter, CPU"
    kind = "triton" if CUDA else "triton (interpreter)"
    print(f"dcae_kernels: the Triton kernels ({where}) against the plain-torch reference, {str(dtype)[6:]}, "
          f"forward + backward, size {size}, {channels} channels\n")
    header = (f"{'op':38} {'input shape':18} {'fwd rel diff':>12} {'grad rel diff':>13} {'agree':>5} "
              f"{kind + ' ms':>23} {'reference ms':>12}")
    print(header + "\n" + "-" * len(header))
    disagree, ops = [], []
    for case in cases(size, channels, dtype):
        ops += [case.op] if case.op not in ops else []
        (y, grads, grads_out), t_ours = timed(lambda: forward_backward(getattr(dk, case.op), case), repeats)
        (y_ref, grads_ref, _), t_ref = timed(
            lambda: forward_backward(getattr(reference, case.op), case, grads_out), repeats)
        fwd, grad = relative_diff(y, y_ref), relative_diff(grads, grads_ref)
        agree = fwd <= TOL[dtype] and grad <= TOL[dtype]
        if not agree:
            disagree.append(case.name)
        shape = "x".join(map(str, case.inputs[0].shape))
        print(f"{case.name:38} {shape:18} {fwd:12.1e} {grad:13.1e} {'yes' if agree else 'NO':>5} "
              f"{t_ours * 1e3:23.1f} {t_ref * 1e3:12.1f}")
    print(f"\nall {len(ops)} ops agree with the reference: {', '.join(ops)}" if not disagree else
          f"\nDISAGREE WITH THE REFERENCE: {', '.join(disagree)}")
    if not CUDA:
        print("(CPU times are the interpreter's, not the kernels': GPU numbers are in csrc_bench/results/)")
    return 1 if disagree else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcae_kernels.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128 if CUDA else 16,
                        help="the high-resolution side of the image-shaped inputs (a multiple of 4)")
    parser.add_argument("--channels", type=int, default=256 if CUDA else 8,
                        help="the channel count of the narrow side (the interpreter's time grows with it)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16" if CUDA else "fp32")
    args = parser.parse_args(argv)
    if args.size < 4 or args.size % 4:
        parser.error(f"--size must be a multiple of 4, >= 4, got {args.size}")
    if args.channels < 1:
        parser.error(f"--channels must be >= 1, got {args.channels}")
    if requested() == "reference":
        return refuse("DCAE_KERNELS_BACKEND=reference")
    if not CUDA and not INTERPRET and HAS_TRITON:  # the interpreter is chosen when triton is imported
        env = dict(os.environ, TRITON_INTERPRET="1")
        return subprocess.run([sys.executable, "-m", "dcae_kernels.demo", *(argv or sys.argv[1:])], env=env).returncode
    if backend() != "triton":
        return refuse(triton_blocker())
    return run(args.size, args.channels, DTYPES[args.dtype])


def refuse(why: str) -> int:
    print(f"the Triton kernels do not run here ({why}): nothing to compare the reference with", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
