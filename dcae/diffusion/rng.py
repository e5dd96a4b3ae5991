"""Random draws from an optional `torch.Generator`: drawn on the generator's device (or ``device`` without one)
and moved to ``device``, so a CPU generator gives the same numbers whatever device the sampler runs on."""
import torch


def randn(shape, generator: torch.Generator | None, device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal of ``shape``."""
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=source, dtype=dtype).to(device)


def randint(high: int, shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform int64 in [0, high) of ``shape``."""
    source = generator.device if generator is not None else device
    return torch.randint(high, shape, generator=generator, device=source).to(device)
