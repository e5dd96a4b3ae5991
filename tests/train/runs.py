"""What the trainer tests share: stopping a run as Ctrl-C would, and comparing two runs' results."""
import contextlib
import json

import torch
from safetensors.torch import load_file

from dcae.train.checkpoint import find_latest
from dcae.train.trainer import Trainer


@contextlib.contextmanager
def ctrl_c_after(monkeypatch, step: int):
    """Inside the block, a run's stop flag (what Ctrl-C sets) rises once ``step`` optimizer steps are done."""
    original = Trainer.train_step

    def train_step(self, batches):
        parts = original(self, batches)
        self.interrupted = self.interrupted or self.step == step
        return parts

    monkeypatch.setattr(Trainer, "train_step", train_step)
    try:
        yield
    finally:
        monkeypatch.setattr(Trainer, "train_step", original)


def metrics_rows(out) -> list[dict]:
    """A run folder's metrics.jsonl without its timing column."""
    return [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_checkpoints(a, b, groups) -> None:
    """The newest checkpoints of run folders ``a`` and ``b`` hold bit-identical tensors in each group."""
    for group in groups:
        x = load_file(find_latest(a / "checkpoints") / f"{group}.safetensors")
        y = load_file(find_latest(b / "checkpoints") / f"{group}.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), group
