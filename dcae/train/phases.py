"""DC-AE's three training phases (Decoupled High-Resolution Adaptation): defaults and what each trains.

Phase 1 trains everything at low resolution; phase 2 adapts the middle layers (encoder's deepest stage + its
output projection, decoder's input projection + the deepest stage it runs first) at high resolution; phase 3
refines the decoder head (its last stage that has parameters + the output projection) with a GAN loss.
"""
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Phase:
    number: int
    resolution: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    gan: bool


PHASES = {
    1: Phase(1, 256, 6.4e-5, 0.1, (0.9, 0.999), gan=False),
    2: Phase(2, 1024, 1.6e-5, 1e-3, (0.9, 0.999), gan=False),
    3: Phase(3, 256, 5.4e-5, 0.0, (0.5, 0.9), gan=True),
}


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def trainable_modules(model, phase: int) -> dict[str, nn.Module]:
    """Qualified name -> module for the parts of a `DCAE` that train in ``phase``."""
    if phase not in PHASES:
        raise ValueError(f"phase must be 1, 2 or 3, got {phase}")
    enc, dec = model.encoder, model.decoder
    if phase == 1:
        return {"": model}
    if phase == 2:
        deepest = len(enc.down_blocks) - 1
        return {f"encoder.down_blocks.{deepest}": enc.down_blocks[deepest], "encoder.conv_out": enc.conv_out,
                "decoder.conv_in": dec.conv_in, f"decoder.up_blocks.{deepest}": dec.up_blocks[deepest]}
    head = next(i for i, stage in enumerate(dec.up_blocks) if _has_params(stage))
    return {f"decoder.up_blocks.{head}": dec.up_blocks[head], "decoder.norm_out": dec.norm_out,
            "decoder.conv_out": dec.conv_out}


def freeze_for_phase(model, phase: int) -> dict[str, int]:
    """Sets ``requires_grad`` for ``phase``; returns trainable module name -> parameter count."""
    modules = trainable_modules(model, phase)
    model.requires_grad_(False)
    for module in modules.values():
        module.requires_grad_(True)
    return {name or "(whole model)": sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def set_train_mode(model, phase: int) -> None:
    """``model.train()`` for the trainable parts only: frozen BatchNorm layers keep their running stats."""
    model.eval()
    for module in trainable_modules(model, phase).values():
        module.train()


def last_layer_weight(model) -> nn.Parameter:
    """The decoder's last conv weight: where phase 3 balances the GAN loss against the reconstruction loss."""
    conv = model.decoder.conv_out
    return conv.weight if isinstance(conv, nn.Conv2d) else conv.conv.weight
