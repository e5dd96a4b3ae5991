"""Learning-rate schedules for torch.optim.lr_scheduler.LambdaLR: linear warmup, then cosine or constant."""
import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

KINDS = ("cosine", "constant")


def lr_lambda(kind: str, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """step -> multiplier of the base lr.

    step < warmup_steps: step / warmup_steps (0 at step 0). Then "constant": 1; "cosine":
    min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2, p = (step - warmup) / (total - warmup) clamped to [0, 1],
    so it reaches min_ratio at total_steps and stays there.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps, got {warmup_steps}, {total_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: Optimizer, kind: str, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> LambdaLR:
    """LambdaLR over every param group with lr_lambda(kind, warmup_steps, total_steps, min_ratio)."""
    return LambdaLR(optimizer, lr_lambda(kind, warmup_steps, total_steps, min_ratio))
