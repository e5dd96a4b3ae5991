"""`LatentTransformer`: the interface DiT and U-ViT share (input checks, class dropout, guidance, gradient
checkpointing) and their construction, loading and saving; each model names only its config class and preset
getter."""
from collections.abc import Callable
from typing import Self

import torch
from torch import nn

from . import transformer_pretrained
from .transformer_config import TransformerConfig


class LatentTransformer(nn.Module):
    """The interface of DiT and U-ViT: ``forward(x, t, y)`` -> (B, out_channels, H, W) with x the scaled latents
    (B, in_channels, H, W), t (B,) timesteps as the timestep embedder takes them (DDPM steps as floats in [0, 1000),
    or whatever continuous time the objective feeds; no rescaling happens here) and y (B,) class ids in
    [0, num_classes] (num_classes: the null class). ``forward`` never drops labels: training calls `drop_labels`."""

    config: TransformerConfig
    # Each model sets these: the config class it takes, and its getter (a preset name, a config or a dict of its
    # fields, with keywords) -> such a config.
    config_class: type[TransformerConfig]
    get_config: Callable[..., TransformerConfig]

    def __init__(self, config: TransformerConfig):
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False

    @classmethod
    def from_config(cls, name_or_config, **kwargs) -> Self:
        """A randomly initialised model of a preset name (with the model's `get_config` keywords: autoencoder,
        resolution, latent_shape, field overrides), a config or a dict of its fields."""
        return cls(cls.get_config(name_or_config, **kwargs))

    @classmethod
    def from_pretrained(cls, path, config=None, dtype: torch.dtype | None = None) -> Self:
        """Our folder, a diffusers `DiTTransformer2DModel` folder (DiT) or the authors' (efficientvit / original
        DiT) checkpoint; see `dcae.models.transformer_pretrained.load`."""
        return transformer_pretrained.load(cls, path, config=config, dtype=dtype)

    def save_pretrained(self, path, format: str = "dcae") -> None:
        """``format="dcae"``: ``config.json`` + ``model.safetensors``; ``"diffusers"`` (DiT only, for configs it
        can express): a `DiTTransformer2DModel` folder. A U-ViT refuses ``"diffusers"`` with a ValueError."""
        transformer_pretrained.save(self, path, format=format)

    def init_buffers(self) -> None:
        """Recompute the buffers that are not in the state dict (fixed functions of the config) on the weights'
        device; loading calls it after assigning the weights. None here; DiT has its position embedding."""

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them (training memory)."""
        self.gradient_checkpointing = enabled

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def check_inputs(self, x, t, y) -> None:
        cfg = self.config
        if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a floating-point (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
        if x.shape[1] != cfg.in_channels or tuple(x.shape[2:]) != cfg.latent_size:
            raise ValueError(f"x must be (B, {cfg.in_channels}, {cfg.latent_size[0]}, {cfg.latent_size[1]}) "
                             f"(in_channels, latent_size), got {tuple(x.shape)}")
        for name, value in (("t", t), ("y", y)):
            if not torch.is_tensor(value) or tuple(value.shape) != (x.shape[0],):
                raise ValueError(f"{name} must be a ({x.shape[0]},) tensor, one per batch element, got "
                                 f"{getattr(value, 'shape', type(value))}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer class ids, got {y.dtype}")

    def drop_labels(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class dropout for training: each label replaced by the null class with probability
        ``class_dropout_prob``, from ``torch.rand(B, generator=generator)`` on the generator's device (so a
        seeded generator gives the same drops on resume)."""
        device = generator.device if generator is not None else y.device
        drop = torch.rand(y.shape, generator=generator, device=device) < self.config.class_dropout_prob
        return torch.where(drop.to(y.device), torch.full_like(y, self.null_class), y)

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                         scale: float | torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance: the conditional (y) and unconditional (null class) branches in one batch of
        2B, then ``uncond + scale * (cond - uncond)`` over all latent channels. ``scale``: a float or a (B,)
        tensor. With learn_sigma the variance channels are the conditional branch's (they are not guided).
        x, t, y as `forward` (B of each) -> (B, out_channels, H, W)."""
        self.check_inputs(x, t, y)
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, self.null_class)]))
        cond, uncond = out.chunk(2)
        if torch.is_tensor(scale) and scale.dim() == 1:
            scale = scale[:, None, None, None]
        c = self.config.in_channels
        guided = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([guided, cond[:, c:]], dim=1)
