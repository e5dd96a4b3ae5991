"""DC-AE's three training phases (Decoupled High-Resolution Adaptation): defaults and which parts each trains.

Phase 1 trains everything at low resolution; phase 2 adapts the middle layers (the encoder's deepest stage and
its output projection, the decoder's input projection and the deepest stage it runs first) at high resolution;
phase 3 refines the decoder head (its last stage that has parameters and its output layers) with a GAN loss.
Parts are picked by the names `DCAE.parts` gives them.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

WHOLE_MODEL = "(whole model)"


@dataclass(frozen=True)
class Phase:
    number: int
    resolution: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    gan: bool
    # model -> the names of the parts this phase trains; None: the whole model
    parts: Callable[[nn.Module], list[str]] | None = field(default=None, repr=False, compare=False)


def _middle(model) -> list[str]:
    deepest = model.deepest_stage
    return [f"encoder.stages.{deepest}", "encoder.out", "decoder.in", f"decoder.stages.{deepest}"]


def _head(model) -> list[str]:
    return [f"decoder.stages.{model.last_decoder_stage}", "decoder.out"]


PHASES = {
    1: Phase(1, 256, 6.4e-5, 0.1, (0.9, 0.999), gan=False),
    2: Phase(2, 1024, 1.6e-5, 1e-3, (0.9, 0.999), gan=False, parts=_middle),
    3: Phase(3, 256, 5.4e-5, 0.0, (0.5, 0.9), gan=True, parts=_head),
}


def trainable_modules(model, phase: int) -> dict[str, nn.Module]:
    """Part name -> module for the parts of a `DCAE` that train in ``phase`` (`WHOLE_MODEL` in phase 1)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be 1, 2 or 3, got {phase}")
    select = PHASES[phase].parts
    return {WHOLE_MODEL: model} if select is None else model.parts(select(model))


def freeze_for_phase(model, phase: int) -> dict[str, int]:
    """Sets ``requires_grad`` for ``phase``; returns trainable part name -> parameter count."""
    modules = trainable_modules(model, phase)
    model.requires_grad_(False)
    for module in modules.values():
        module.requires_grad_(True)
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def set_train_mode(model, phase: int) -> None:
    """``model.train()`` for the trainable parts only: frozen BatchNorm layers keep their running stats."""
    model.eval()
    for module in trainable_modules(model, phase).values():
        module.train()
