"""`make demo`: every op on example tensors through the active backend and the reference, forward and
backward: do they agree, and how long does each take. Without CUDA the Triton kernels run under Triton's
interpreter (the real kernel code, on numpy; slow)."""
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dcae_kernels as dk  # noqa: E402
from dcae_kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOL = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
SIZE = 128 if DEVICE == "cuda" else 32


def cases():
    """(name, active op, reference op, inputs, extra args)."""
    x = torch.randn(2, 64, SIZE, SIZE, device=DEVICE, dtype=DTYPE)
    down_res = torch.randn(2, 128, SIZE // 2, SIZE // 2, device=DEVICE, dtype=DTYPE)
    up_in = torch.randn(2, 128, SIZE // 2, SIZE // 2, device=DEVICE, dtype=DTYPE)
    yield "space_to_channel_avg 64->128", dk.space_to_channel_avg, reference.space_to_channel_avg, (x,), (128, 2)
    yield ("space_to_channel_avg+add 64->128", dk.space_to_channel_avg, reference.space_to_channel_avg,
           (x, down_res), (128, 2))
    yield "channel_to_space_dup 128->64", dk.channel_to_space_dup, reference.channel_to_space_dup, (up_in,), (64, 2)
    yield ("channel_to_space_dup+add 128->64", dk.channel_to_space_dup, reference.channel_to_space_dup,
           (up_in, x), (64, 2))
    qkv = torch.randn(2, 8 * 96, SIZE // 2, SIZE // 2, device=DEVICE, dtype=DTYPE)
    yield "relu_linear_attention 8 heads d32", dk.relu_linear_attention, reference.relu_linear_attention, (qkv,), (32,)
    tokens = tuple(torch.randn(2, SIZE * 4, 8, 64, device=DEVICE, dtype=DTYPE) for _ in range(3))
    yield ("relu_linear_attention_tokens d64", dk.relu_linear_attention_tokens,
           reference.relu_linear_attention_tokens, tokens, ())


def timed(fn, repeats=3 if DEVICE == "cuda" else 1):
    """(result, median seconds) of fn()."""
    times, out = [], None
    for _ in range(repeats):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return out, sorted(times)[len(times) // 2]


def run_case(op, ref, inputs, args):
    """(max |forward diff|, max |gradient diff|, active ms, reference ms), forward + backward each."""
    def fwd_bwd(fn):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        y = fn(leaves[0], *args, *leaves[1:])
        grad = torch.ones_like(y)
        return (y.detach(), *torch.autograd.grad(y, leaves, grad))

    mine, t_mine = timed(lambda: fwd_bwd(op))
    theirs, t_ref = timed(lambda: fwd_bwd(ref))
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(mine, theirs)]
    return diffs[0], max(diffs[1:]), t_mine * 1e3, t_ref * 1e3


def main():
    where = f"CUDA, {torch.cuda.get_device_name()}" if DEVICE == "cuda" else "CPU, Triton interpreter"
    print(f"dcae_kernels backend: {dk.backend()} ({where}); dtype {str(DTYPE)[6:]}; forward + backward\n")
    header = f"{'op':36} {'shape':20} {'max|fwd diff|':>14} {'max|grad diff|':>15} {'agree':>6} " \
             f"{dk.backend() + ' ms':>11} {'reference ms':>13}"
    print(header + "\n" + "-" * len(header))
    all_agree = True
    for name, op, ref, inputs, args in cases():
        fwd, grad, t_mine, t_ref = run_case(op, ref, inputs, args)
        agree = fwd <= TOL and grad <= TOL
        all_agree &= agree
        print(f"{name:36} {'x'.join(map(str, inputs[0].shape)):20} {fwd:14.2e} {grad:15.2e} "
              f"{'yes' if agree else 'NO':>6} {t_mine:11.2f} {t_ref:13.2f}")
    print("\nall ops agree with the reference" if all_agree else "\nSOME OPS DISAGREE WITH THE REFERENCE")
    if DEVICE == "cpu":
        print("(times on CPU are the Triton interpreter's: the GPU numbers are in csrc_bench/results/)")
    return 0 if all_agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
