"""Diffusion transformers on autoencoder latents as data: `DiTConfig`, `UViTConfig` and their named presets.

A preset names an architecture (depth, hidden size, heads); the latent shape it models comes from a DC-AE preset
and an image resolution (``get_dit_config("dit-xl", "dc-ae-f32c32-in-1.0", 512)``: 32 channels, 16 x 16 latents,
patch 1) or is given directly (``latent_shape=(4, 64, 64)`` for SD-VAE-f8 latents at 512 px).
"""
import dataclasses
import json
from dataclasses import dataclass

from .config import get_config as get_dcae_config

ATTENTIONS = ("softmax", "linear")
FFNS = ("mlp", "glumbconv")
MLP_RATIOS = {"mlp": 4.0, "glumbconv": 2.5}  # the default of each FFN (DiT / U-ViT; Sana's Mix-FFN)


@dataclass(frozen=True)
class TransformerConfig:
    """What DiT and U-ViT share. ``latent_size``: (height, width) of the latents (an int means square);
    ``attention="linear"`` is Sana's ReLU linear attention with heads of ``linear_head_dim`` channels (``num_heads``
    is then unused); ``mlp_ratio`` None takes the FFN's default (4 for ``mlp``, 2.5 for ``glumbconv``).
    Class ``num_classes`` (an extra embedding row) is the null class of class dropout and unguided branches."""

    latent_size: tuple[int, int]
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int = 1
    mlp_ratio: float | None = None
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False
    qkv_bias: bool = True
    attention: str = "softmax"
    ffn: str = "mlp"
    linear_head_dim: int = 32

    def __post_init__(self):
        size = self.latent_size
        object.__setattr__(self, "latent_size", (size, size) if isinstance(size, int) else tuple(size))
        if self.mlp_ratio is None:
            object.__setattr__(self, "mlp_ratio", MLP_RATIOS.get(self.ffn, 4.0))
        self.validate()

    def validate(self):
        for name in ("in_channels", "hidden_size", "depth", "num_heads", "patch_size", "num_classes",
                     "linear_head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if len(self.latent_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                             for s in self.latent_size):
            raise ValueError(f"latent_size must be an int or (height, width) of ints >= 1, got {self.latent_size!r}")
        if any(s % self.patch_size for s in self.latent_size):
            raise ValueError(f"latent_size {self.latent_size} must be divisible by patch_size {self.patch_size}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.ffn not in FFNS:
            raise ValueError(f"ffn must be one of {FFNS}, got {self.ffn!r}")
        divisor = ("linear_head_dim", self.linear_head_dim) if self.attention == "linear" else ("num_heads",
                                                                                             self.num_heads)
        if self.hidden_size % divisor[1]:
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by {divisor[0]} {divisor[1]} "
                             f"({self.attention} attention)")
        if not self.mlp_ratio > 0 or int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob!r}")

    @property
    def heads(self) -> int:
        """Attention heads: ``num_heads`` (softmax) or ``hidden_size / linear_head_dim`` (linear)."""
        return self.hidden_size // self.linear_head_dim if self.attention == "linear" else self.num_heads

    @property
    def grid(self) -> tuple[int, int]:
        """The token grid (height, width): the latent size over the patch size."""
        return self.latent_size[0] // self.patch_size, self.latent_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def out_channels(self) -> int:
        """Output channels: the latent channels, then (learn_sigma) as many variance channels."""
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass(frozen=True)
class DiTConfig(TransformerConfig):
    """DiT (adaLN-Zero). The original's defaults; diffusers' `DiTTransformer2DModel` is
    ``timestep_freq_shift=1`` (its sinusoid's exponent over half - 1 instead of half) and ``mlp_norm_eps=1e-5``
    (its ``norm_eps``: the LayerNorm before the MLP; the one before attention and the final one are 1e-6 in both)."""

    learn_sigma: bool = True
    timestep_freq_shift: int = 0
    mlp_norm_eps: float = 1e-6

    def validate(self):
        super().validate()
        if self.timestep_freq_shift not in (0, 1):
            raise ValueError(f"timestep_freq_shift must be 0 (DiT) or 1 (diffusers), got {self.timestep_freq_shift!r}")
        if not self.mlp_norm_eps > 0:
            raise ValueError(f"mlp_norm_eps must be > 0, got {self.mlp_norm_eps!r}")


@dataclass(frozen=True)
class UViTConfig(TransformerConfig):
    """U-ViT as efficientvit trains it on DC-AE latents: qkv without bias, the timestep sinusoid itself as a
    token (no time MLP), no final conv."""

    qkv_bias: bool = False


EXTRA_TOKENS = 2  # U-ViT's tokens before the patches: class, time


# (depth, hidden_size, num_heads) and, for the tiny ones, the classes and default latents they are meant for.
DIT_PRESETS = {"dit-s": (12, 384, 6), "dit-b": (12, 768, 12), "dit-l": (24, 1024, 16), "dit-xl": (28, 1152, 16),
               "dit-tiny": (4, 64, 4)}
UVIT_PRESETS = {"uvit-s": (12, 512, 8), "uvit-m": (16, 768, 12), "uvit-l": (20, 1024, 16), "uvit-h": (28, 1152, 16),
                "uvit-2b": (28, 2048, 32), "uvit-tiny": (4, 64, 4)}
# Where each family's latents come from by default: the paper's DC-AE-f32c32 at 512 px; the tiny presets (tests,
# the CPU demo): the tiny 8-channel DC-AE at 256 px (8 x 8 latents), 10 classes (digits).
DEFAULT_LATENTS = ("dc-ae-f32c32-in-1.0", 512, 1000)
TINY_LATENTS = ("tiny-f32c8", 256, 10)


def latent_shape_of(autoencoder: str, resolution: int) -> tuple[int, int, int]:
    """(channels, height, width) of a DC-AE preset's latents for square images of ``resolution`` px."""
    ae = get_dcae_config(autoencoder)
    ratio = ae.spatial_compression_ratio
    if resolution % ratio:
        raise ValueError(f"resolution {resolution} is not a multiple of {autoencoder}'s compression ratio {ratio}")
    return ae.latent_channels, resolution // ratio, resolution // ratio


def _from_preset(cls, presets: dict, name: str, autoencoder, resolution, latent_shape, overrides):
    if name not in presets:
        raise ValueError(f"unknown {cls.__name__[:-6]} preset {name!r}; presets: {sorted(presets)}")
    depth, hidden, heads = presets[name]
    default_ae, default_res, classes = TINY_LATENTS if name.endswith("-tiny") else DEFAULT_LATENTS
    if latent_shape is None:
        latent_shape = latent_shape_of(autoencoder or default_ae, resolution or default_res)
    elif autoencoder is not None or resolution is not None:
        raise ValueError("pass either latent_shape or autoencoder / resolution, not both")
    channels, height, width = latent_shape
    fields = dict(latent_size=(height, width), in_channels=channels, hidden_size=hidden, depth=depth,
                  num_heads=heads, num_classes=classes)
    return cls(**{**fields, **overrides})


def get_dit_config(name_or_config, autoencoder: str | None = None, resolution: int | None = None,
                   latent_shape: tuple[int, int, int] | None = None, **overrides) -> DiTConfig:
    """A `DiTConfig`: a preset name (on the latents of ``autoencoder`` at ``resolution`` px, or of
    ``latent_shape`` = (channels, height, width); ``overrides`` replace fields), a `DiTConfig` as is, or a dict
    of its fields."""
    return _get(DiTConfig, DIT_PRESETS, name_or_config, autoencoder, resolution, latent_shape, overrides)


def get_uvit_config(name_or_config, autoencoder: str | None = None, resolution: int | None = None,
                    latent_shape: tuple[int, int, int] | None = None, **overrides) -> UViTConfig:
    """A `UViTConfig`, as `get_dit_config`."""
    return _get(UViTConfig, UVIT_PRESETS, name_or_config, autoencoder, resolution, latent_shape, overrides)


def _get(cls, presets, name_or_config, autoencoder, resolution, latent_shape, overrides):
    if isinstance(name_or_config, str):
        return _from_preset(cls, presets, name_or_config, autoencoder, resolution, latent_shape, overrides)
    if autoencoder is not None or resolution is not None or latent_shape is not None:
        raise ValueError("autoencoder / resolution / latent_shape apply to preset names only")
    if isinstance(name_or_config, dict):
        config = cls.from_dict(name_or_config)
    elif isinstance(name_or_config, cls):
        config = name_or_config
    else:
        raise TypeError(f"expected a {cls.__name__}, a dict of its fields or a preset name, got "
                        f"{type(name_or_config).__name__}")
    return dataclasses.replace(config, **overrides) if overrides else config
