"""Training options declared once, as dataclass fields; the command line is generated from them.

`TrainOptions` holds what the training core uses (run folder, steps, batch, optimizer, schedule, EMA, saving,
logging, device); each task subclasses it with its own fields. A field's ``metadata`` carries its ``help``,
and optionally ``choices``, ``flag`` (the option's name when it is not ``--field-name``) and ``default_text``
(how help describes a default resolved later, e.g. per training phase). `add_arguments` turns the fields into
argparse options and `from_args` back into the dataclass, whose ``__post_init__`` validates them.
"""
import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

SCHEDULES = ("constant", "cosine")


def option(default=dataclasses.MISSING, help: str = "", **metadata):
    """A dataclass field with its command-line help (see the module docstring for the other metadata)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(kw_only=True)
class TrainOptions:
    """What the training core reads. Values a task resolves from its recipe (lr, weight decay, betas) are None
    until the task's ``__post_init__`` fills them in."""

    out: Path = option(help="run folder: checkpoints, logs, images, final model")
    resume: bool = option(False, "continue from the newest checkpoint in --out")
    steps: int = option(1000, "optimizer steps to train")
    batch_size: int = option(8, "global batch per optimizer step, over all processes and micro-batches")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float | None = option(None, "AdamW learning rate")
    weight_decay: float | None = option(None, "AdamW weight decay")
    betas: tuple[float, float] | None = option(None, "AdamW betas")
    schedule: str = option("constant", "learning-rate schedule after the warm-up", choices=SCHEDULES)
    warmup_steps: int = option(0, "linear learning-rate warm-up steps")
    ema_decay: float | None = option(None, "keep an EMA of the trained weights (evaluated and exported)")
    grad_checkpointing: bool = option(False, "recompute activations in backward: less memory, ~30%% more compute")
    save_every: int = option(500, "checkpoint every N steps (also at the end and on Ctrl-C)")
    keep_checkpoints: int = option(3, "checkpoints kept in --out/checkpoints")
    log_every: int = option(10, "a metrics.jsonl line every N steps")
    image_every: int = option(250, "a sample grid PNG every N steps")
    seed: int = option(0, "seeds the model's initialisation and every sample's randomness")
    workers: int = option(0, "DataLoader worker processes")
    device: str | None = option(None, "cuda or cpu (default: cuda when available)")
    progress: bool = option(True, "no tqdm bar", flag="--no-progress")

    def __post_init__(self):
        """Validates every core field; a task's ``__post_init__`` first fills what its recipe decides (`fill`),
        then calls this."""
        if self.out is None or str(self.out) == "":
            raise ValueError("--out is required: the run folder")
        self.out = Path(self.out)
        for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "image_every",
                     "keep_checkpoints"):
            _check_int(name, getattr(self, name), 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("workers", self.workers, 0)
        if self.warmup_steps > self.steps:
            raise ValueError(f"--warmup-steps {self.warmup_steps} is more than --steps {self.steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1], got {self.ema_decay}")
        if self.device is not None:
            check_device(self.device)
        if self.lr is None or not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.weight_decay is None or not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        self.betas = tuple(self.betas or ())
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"--betas must be two numbers in [0, 1), got {self.betas}")

    def fill(self, **recipe) -> None:
        """Set the fields the user left None to a recipe's values."""
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def check_device(text: str) -> torch.device:
    """cpu, cuda or cuda:N, refused (ValueError) when this machine has no such device."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device {text!r} (expected cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {text!r} (expected cpu, cuda or cuda:N)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")


def _base_type(annotation):
    """(type, optional) of ``X`` / ``X | None``."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return annotation, False


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the options dataclass ``cls`` (the fields ``cls`` adds first, then the core's);
    help shows each default."""
    hints = typing.get_type_hints(cls)
    core = {f.name for f in dataclasses.fields(TrainOptions)}
    for f in sorted(dataclasses.fields(cls), key=lambda f: f.name in core):
        kind, _ = _base_type(hints[f.name])
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        text = meta.pop("default_text", None)
        kwargs = dict(dest=f.name, help=meta.pop("help", ""), **meta)
        required = f.default is dataclasses.MISSING
        if kind is bool:
            kwargs["action"] = (argparse.BooleanOptionalAction if f.default is None
                                else "store_false" if f.default else "store_true")
            if text is not None:
                kwargs["help"] += f" (default: {text})"
        else:
            if typing.get_origin(kind) is tuple:
                kwargs.update(type=typing.get_args(kind)[0], nargs=len(typing.get_args(kind)))
            else:
                kwargs["type"] = kind
            if text is None and not required and f.default is not None:
                text = f.default
            if text is not None:
                kwargs["help"] += f" (default: {text})"
            kwargs["required"] = required
        if not required:
            kwargs["default"] = f.default
        parser.add_argument(flag, **kwargs)


def from_args(cls: type, args: argparse.Namespace):
    """The options dataclass ``cls`` from parsed arguments (other attributes of ``args`` are ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
