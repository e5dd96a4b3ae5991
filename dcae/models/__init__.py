"""DC-AE models: configs as data, blocks on the dcae_kernels ops, the autoencoder."""
from .autoencoder import DCAE, Decoder, Encoder
from .config import PRESETS, DCAEConfig, get_config

__all__ = ["DCAE", "DCAEConfig", "Decoder", "Encoder", "PRESETS", "get_config"]
