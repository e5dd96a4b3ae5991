"""DC-AE models, diffusion models and the trainer, built on the dcae_kernels ops."""
from .models import (DCAE, PRESETS, DCAEConfig, DiT, DiTConfig, UViT, UViTConfig, get_config, get_dit_config,
                     get_uvit_config)
from .scaling import estimate_scaling_factor

__all__ = ["DCAE", "DCAEConfig", "DiT", "DiTConfig", "PRESETS", "UViT", "UViTConfig", "estimate_scaling_factor",
           "get_config", "get_dit_config", "get_uvit_config"]
