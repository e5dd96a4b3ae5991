"""The device copy bandwidth: the ceiling every memory-bound kernel is measured against."""
import torch

from .common import bench_marks, measure

pytestmark = bench_marks


def test_copy(benchmark):
    size = 1 << 30
    a = torch.randint(0, 255, (size,), device="cuda", dtype=torch.uint8)
    b = torch.empty_like(a)
    measure(benchmark, lambda: b.copy_(a), kernel="copy", provider="torch", mode="fwd",
            shape="1 GiB", nbytes=2 * size)
