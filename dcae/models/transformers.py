"""The diffusion transformers on DC-AE latents, for callers that take either: which model a config builds
(`model_class`) and loading a checkpoint of whichever it holds (`load_transformer`)."""
import torch

from . import transformer_pretrained
from .dit import DiT
from .latent_transformer import LatentTransformer
from .transformer_config import TransformerConfig
from .uvit import UViT

MODELS = (DiT, UViT)


def model_class(config: TransformerConfig) -> type[LatentTransformer]:
    """DiT for a `DiTConfig`, UViT for a `UViTConfig`."""
    for cls in MODELS:
        if isinstance(config, cls.config_class):
            return cls
    names = " or a ".join(cls.config_class.__name__ for cls in MODELS)
    raise TypeError(f"config must be a {names}, got {type(config).__name__}")


def load_transformer(path, config=None, dtype: torch.dtype | None = None) -> LatentTransformer:
    """The DiT or U-ViT at ``path``, whichever it holds (see `transformer_pretrained.load`)."""
    return transformer_pretrained.load(MODELS, path, config=config, dtype=dtype)
