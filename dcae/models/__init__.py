"""DC-AE models: configs as data, blocks on the dcae_kernels ops, the autoencoder, and the diffusion transformers
(DiT, U-ViT) on its latents."""
from .autoencoder import DCAE, Decoder, Encoder
from .config import PRESETS, DCAEConfig, get_config
from .dit import DiT
from .transformer_config import DIT_PRESETS, UVIT_PRESETS, DiTConfig, UViTConfig, get_dit_config, get_uvit_config
from .uvit import UViT

__all__ = ["DCAE", "DCAEConfig", "DIT_PRESETS", "Decoder", "DiT", "DiTConfig", "Encoder", "PRESETS", "UVIT_PRESETS",
           "UViT", "UViTConfig", "get_config", "get_dit_config", "get_uvit_config"]
