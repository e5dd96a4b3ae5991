"""What the training core needs to know about one kind of training: a `Task`.

The core (`trainer.Trainer`) owns the loop, the optimizer and schedule, EMA, DDP, checkpoints and exact resume,
the stop flag, the run folder's records, plots and sample grids; it knows nothing about what it trains. A task
subclasses `Task` and implements its hooks: the model, which of its parameters train, the training items, the
loss of a micro-batch, and what to evaluate, draw and export. Hooks with a default here are optional.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from . import distributed


@dataclass
class Context:
    """What the core gives a task: where it runs and how it reports."""

    world: distributed.World
    device: torch.device
    autocast: Any  # a context manager: bf16 autocast on CUDA, a no-op on CPU
    out: Path
    log: Callable[..., None]  # log(*lines): printed by rank 0 only


class Task(ABC):
    """One kind of training on the core. ``options`` is the task's `TrainOptions` subclass instance."""

    #: label of the progress bar and the loss plot, e.g. "DC-AE phase 1"
    title: str = "training"
    #: eval.json's key for the metrics after training ("before" holds those before it)
    eval_key: str = "after"
    #: the part of `loss`'s parts the progress bar shows
    progress_key: str = "loss"

    def __init__(self, options):
        self.options = options
        self.ctx: Context | None = None

    def setup(self, ctx: Context) -> None:
        """Called once before anything else: build losses and auxiliary networks on ``ctx.device``."""
        self.ctx = ctx

    @abstractmethod
    def build_model(self, saved: dict | None) -> nn.Module:
        """The model to train, on the CPU, in fp32: from the options, or (on resume) from ``saved``, the json state
        `state` returned when the checkpoint was written. Its weights are then loaded from the checkpoint. The model
        implements ``enable_gradient_checkpointing(bool)``."""

    def freeze(self, model: nn.Module) -> dict[str, int]:
        """Set ``requires_grad`` on the parameters that train; return a record of what trains (name -> parameter
        count). Default: everything."""
        model.requires_grad_(True)
        return {"(whole model)": sum(p.numel() for p in model.parameters())}

    def train_mode(self, model: nn.Module) -> None:
        """Put ``model`` in training mode (a task that freezes parts may keep them in eval mode)."""
        model.train()

    @abstractmethod
    def train_set(self) -> Dataset:
        """Training items. An item's randomness must come from torch's global RNG inside ``__getitem__``: the core
        seeds it per item (seed, epoch, index), so batches depend neither on the process count nor on resuming."""

    @abstractmethod
    def loss(self, net: nn.Module, batch: Any, step: int) -> tuple[Tensor, dict[str, float]]:
        """(loss to minimise, float parts to log) of one micro-batch, run under the core's autocast. ``net`` is
        the model, wrapped in DistributedDataParallel when there are several processes; ``batch`` a collated
        micro-batch on the CPU; ``step`` the optimizer step being taken (0-based)."""

    def after_step(self, step: int) -> dict[str, float]:
        """Called after each optimizer step (e.g. a discriminator's own step); returns more parts to log."""
        return {}

    def state(self) -> tuple[dict[str, dict[str, Tensor]], dict]:
        """(tensor groups, json) the task adds to every checkpoint: what `build_model` needs, auxiliary networks
        and their optimizers. The group names "model", "optimizer" and "ema" belong to the core."""
        return {}, {}

    def load_state(self, tensors: dict[str, dict[str, Tensor]], state: dict) -> None:
        """Restore what `state` saved."""

    def describe(self, model: nn.Module) -> tuple[dict, list[str]]:
        """(fields added to run.json, lines logged at start)."""
        return {}, []

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        """Held-out metrics, with the weights that are exported (EMA when kept), in eval mode, without grad; None
        when the task has none. Recorded in eval.json before training and after it."""
        return None

    def format_metrics(self, metrics: dict[str, float]) -> str:
        """One log line of `evaluate`'s metrics."""
        return ", ".join(f"{k}: {v:.4f}" for k, v in metrics.items())

    def samples(self, model: nn.Module, step: int) -> Tensor | None:
        """An image grid (3, H, W) in [-1, 1] to save as ``samples/step-*.png``, drawn like `evaluate`; or None."""
        return None

    @abstractmethod
    def export(self, model: nn.Module, folder: Path) -> None:
        """Write the trained model (EMA weights when kept, in eval mode) to ``folder`` at the end."""
