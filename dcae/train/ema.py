"""Exponential moving average of a model's trainable weights, for evaluation and release."""
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class EMA:
    """fp32 shadow copies of the parameters that require grad (when built) and copies of all buffers.

    update: shadow <- d * shadow + (1 - d) * param, with d = decay, or with warmup
    d = min(decay, (1 + t) / (10 + t)) where t = 1, 2, ... counts updates (this one included).
    Buffers (e.g. BatchNorm statistics) are copied, not averaged. Weights are keyed like model.state_dict(),
    so state_dict()["weights"] loads into the model with strict=False. Frozen parameters are not tracked:
    build a new EMA when the set of trainable parameters changes (phases 2 and 3).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.params = {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.buffers = {name: b.detach().clone() for name, b in model.named_buffers()}

    def current_decay(self) -> float:
        """The decay the next update() uses."""
        if not self.warmup:
            return self.decay
        t = self.num_updates + 1
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        params, buffers = self._model_tensors(model)
        for name, shadow in self.params.items():
            shadow.lerp_(params[name].float(), 1.0 - decay)
        for name, shadow in self.buffers.items():
            shadow.copy_(buffers[name])
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights and buffers into the model (cast to each tensor's dtype)."""
        params, buffers = self._model_tensors(model)
        for name, shadow in self.params.items():
            params[name].copy_(shadow)
        for name, shadow in self.buffers.items():
            buffers[name].copy_(shadow)

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run the body with the EMA weights in `model`; its own weights come back afterwards, also on error."""
        params, buffers = self._model_tensors(model)
        saved = {name: params[name].detach().clone() for name in self.params}
        saved_buffers = {name: buffers[name].detach().clone() for name in self.buffers}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
                for name, value in saved_buffers.items():
                    buffers[name].copy_(value)

    def state_dict(self) -> dict:
        """{"num_updates": int, "weights": {name: Tensor}} (tracked parameters in fp32, then buffers)."""
        return {"num_updates": self.num_updates, "weights": {**self.params, **self.buffers}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        weights = state["weights"]
        expected = self.params.keys() | self.buffers.keys()
        if weights.keys() != expected:
            raise ValueError(f"EMA weights do not match the tracked tensors: missing "
                             f"{sorted(expected - weights.keys())}, unexpected {sorted(weights.keys() - expected)}")
        for name, shadow in {**self.params, **self.buffers}.items():
            if weights[name].shape != shadow.shape:
                raise ValueError(f"EMA weight {name}: shape {tuple(weights[name].shape)}, "
                                 f"expected {tuple(shadow.shape)}")
            shadow.copy_(weights[name])
        self.num_updates = int(state["num_updates"])

    def _model_tensors(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        missing = sorted((self.params.keys() - params.keys()) | (self.buffers.keys() - buffers.keys()))
        if missing:
            raise ValueError(f"model lacks tensors the EMA tracks: {missing}")
        return params, buffers
