"""The latent scaling factor: ``1 / RMS`` of the latents over a dataset, no shift (DC-AE paper, appendix D)."""
from collections.abc import Iterable

import torch


@torch.no_grad()
def estimate_scaling_factor(model, images, batch_size: int = 8) -> float:
    """``1 / sqrt(mean(z^2))`` over the latents of ``images``.

    images: a (N, 3, H, W) tensor in [-1, 1], or an iterable of such batches (e.g. a DataLoader yielding
    tensors or (tensor, ...) tuples). Runs on the model's device in its dtype, accumulating in fp64.
    """
    param = next(model.parameters())
    batches = images.split(batch_size) if torch.is_tensor(images) else images
    if not isinstance(batches, Iterable):
        raise TypeError(f"images must be a tensor or an iterable of tensors, got {type(images)}")
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        z = model.encode(x.to(param.device, param.dtype))
        total += z.double().square().sum().cpu()
        count += z.numel()
    if count == 0:
        raise ValueError("estimate_scaling_factor needs at least one image")
    rms = (total / count).sqrt().item()
    if rms == 0.0:
        raise ValueError("all latents are zero: the scaling factor is undefined")
    return 1.0 / rms
