"""DC-AE models, diffusion models and the trainer, built on the dcae_kernels ops."""
from .models import DCAE, PRESETS, DCAEConfig, get_config
from .scaling import estimate_scaling_factor

__all__ = ["DCAE", "DCAEConfig", "PRESETS", "estimate_scaling_factor", "get_config"]
