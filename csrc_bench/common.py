"""Shared benchmark plumbing: GPU skip marker, a CUDA-synchronised timer for pytest-benchmark, `measure`."""
import math
import re
import time

import pytest
import torch

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(),
                                  reason="benchmarks need a CUDA GPU; this machine has none")
ROUND_MS = 10.0  # each wall-clock round runs the function enough times to last about this long
ROUNDS = 5


def cuda_timer() -> float:
    """Seconds, read once the device has finished all queued work (pytest-benchmark calls it per round)."""
    torch.cuda.synchronize()
    return time.perf_counter()


# Applied to every bench module: GPU only, timed with cuda_timer.
bench_marks = [requires_gpu, pytest.mark.benchmark(timer=cuda_timer, disable_gc=True)]


def compiled(fn):
    """torch.compile(fn) with static shapes and room for one compiled graph per benchmarked shape."""
    torch._dynamo.config.cache_size_limit = 256
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    return torch.compile(fn, dynamic=False)


def slug(name: str) -> str:
    """A device name as results files spell it: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def grad_fn(fn, inputs, grad):
    """A function running fn forward and backward (torch.autograd.grad: nothing accumulates)."""
    return lambda: torch.autograd.grad(fn(*inputs), inputs, grad)


def measure(benchmark, fn, *, kernel: str, provider: str, mode: str, shape: str, nbytes: int,
            flops: int | None = None) -> None:
    """Warm ``fn`` up (compile, autotune), then time it twice: device time per call with CUDA events and an
    L2 flush between calls (triton.testing.do_bench, median; the kernel figure, as in anchors-gpu.md), and
    wall time per call of back-to-back calls through pytest-benchmark (what an eager caller sees, launch
    overhead included). Metadata goes to ``extra_info`` for ``python -m csrc_bench report``.
    Bytes: inputs read once + outputs written once."""
    import triton.testing

    for _ in range(3):
        fn()
    device_ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    start = cuda_timer()
    fn()
    once_ms = (cuda_timer() - start) * 1e3
    iterations = max(1, math.ceil(ROUND_MS / max(once_ms, 1e-3)))
    benchmark.extra_info.update(kernel=kernel, provider=provider, mode=mode, shape=shape, bytes=nbytes,
                                flops=flops, device_ms=device_ms, gpu=torch.cuda.get_device_name())
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=iterations, warmup_rounds=1)
