"""DC-AE architectures as data: `DCAEConfig` and the named presets.

Per-stage tuples run from the highest resolution (stage 0) to the lowest; the decoder tuples use the same
stage order (its stage i works at the resolution of encoder stage i).
"""
import dataclasses
import json
from dataclasses import dataclass

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORMS = ("rms_norm", "batch_norm")
ACTS = ("relu", "relu6", "silu", "gelu")
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "conv")
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")


@dataclass(frozen=True)
class DCAEConfig:
    """One DC-AE architecture. ``spatial_compression_ratio = 2 ** (stages - 1)``."""

    encoder_widths: tuple[int, ...]
    decoder_widths: tuple[int, ...]
    encoder_depths: tuple[int, ...]
    decoder_depths: tuple[int, ...]
    encoder_block_types: tuple[str, ...]
    decoder_block_types: tuple[str, ...]
    latent_channels: int
    encoder_norms: tuple[str, ...] = ()
    encoder_acts: tuple[str, ...] = ()
    decoder_norms: tuple[str, ...] = ()
    decoder_acts: tuple[str, ...] = ()
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ()
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ()
    downsample_block_type: str = "pixel_unshuffle"
    upsample_block_type: str = "pixel_shuffle"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_out_act: str = "relu"
    attention_head_dim: int = 32
    in_channels: int = 3
    scaling_factor: float = 1.0

    def __post_init__(self):
        n = len(self.encoder_widths)
        defaults = {"encoder_norms": ("rms_norm",) * n, "encoder_acts": ("silu",) * n,
                    "decoder_norms": ("rms_norm",) * n, "decoder_acts": ("silu",) * n,
                    "encoder_qkv_multiscales": ((),) * n, "decoder_qkv_multiscales": ((),) * n}
        for name, value in defaults.items():
            if not getattr(self, name):
                object.__setattr__(self, name, value)
        for name in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            object.__setattr__(self, name, tuple(tuple(s) for s in getattr(self, name)))
        for f in dataclasses.fields(self):
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        self.validate()

    @property
    def num_stages(self) -> int:
        return len(self.encoder_widths)

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (self.num_stages - 1)

    def validate(self):
        n = self.num_stages
        if n < 1:
            raise ValueError("a DC-AE needs at least one stage")
        for name in ("decoder_widths", "encoder_depths", "decoder_depths", "encoder_block_types",
                     "decoder_block_types", "encoder_norms", "encoder_acts", "decoder_norms", "decoder_acts",
                     "encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected one per stage ({n})")
        for name, allowed in (("encoder_block_types", BLOCK_TYPES), ("decoder_block_types", BLOCK_TYPES),
                              ("encoder_norms", NORMS), ("decoder_norms", NORMS), ("encoder_acts", ACTS),
                              ("decoder_acts", ACTS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"{name}: {bad} not among {allowed}")
        if self.downsample_block_type not in DOWNSAMPLE_TYPES:
            raise ValueError(f"downsample_block_type must be one of {DOWNSAMPLE_TYPES}")
        if self.upsample_block_type not in UPSAMPLE_TYPES:
            raise ValueError(f"upsample_block_type must be one of {UPSAMPLE_TYPES}")
        if self.decoder_out_act not in ACTS:
            raise ValueError(f"decoder_out_act must be one of {ACTS}")
        if self.encoder_out_shortcut and self.encoder_widths[-1] % self.latent_channels:
            raise ValueError("the encoder's output shortcut needs latent_channels to divide the last width")
        if self.decoder_in_shortcut and self.decoder_widths[-1] % self.latent_channels:
            raise ValueError("the decoder's input shortcut needs latent_channels to divide the last width")
        for side in ("encoder", "decoder"):
            for width, block in zip(getattr(self, f"{side}_widths"), getattr(self, f"{side}_block_types")):
                if block == "EfficientViTBlock" and width % self.attention_head_dim:
                    raise ValueError(f"{side} width {width} is not a multiple of attention_head_dim")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DCAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown DCAEConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _in_mix(widths, enc_depths, dec_depths, latent, scaling_factor) -> DCAEConfig:
    """The authors' f32c32 / f64c128 / f128c512 "in" and "mix" layout."""
    n = len(widths)
    vit = lambda k: ("ResBlock",) * k + ("EfficientViTBlock",) * (n - k)  # noqa: E731
    return DCAEConfig(
        encoder_widths=widths, decoder_widths=widths, encoder_depths=enc_depths, decoder_depths=dec_depths,
        encoder_block_types=vit(3), decoder_block_types=vit(3), latent_channels=latent,
        decoder_norms=("batch_norm",) * 3 + ("rms_norm",) * (n - 3),
        decoder_acts=("relu",) * 3 + ("silu",) * (n - 3), scaling_factor=scaling_factor)


def _sana(scaling_factor) -> DCAEConfig:
    blocks = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    scales = ((),) * 3 + ((5,),) * 3
    return DCAEConfig(
        encoder_widths=(128, 256, 512, 512, 1024, 1024), decoder_widths=(128, 256, 512, 512, 1024, 1024),
        encoder_depths=(2, 2, 2, 3, 3, 3), decoder_depths=(3, 3, 3, 3, 3, 3),
        encoder_block_types=blocks, decoder_block_types=blocks, latent_channels=32,
        encoder_qkv_multiscales=scales, decoder_qkv_multiscales=scales,
        downsample_block_type="conv", upsample_block_type="interpolate", scaling_factor=scaling_factor)


_F32 = (128, 256, 512, 512, 1024, 1024)
_ENC, _DEC = (0, 4, 8, 2, 2, 2), (0, 5, 10, 2, 2, 2)
_TINY = (16, 32, 64, 64, 64, 64)

PRESETS: dict[str, DCAEConfig] = {
    "dc-ae-f32c32-in-1.0": _in_mix(_F32, _ENC, _DEC, 32, 0.3189),
    "dc-ae-f32c32-mix-1.0": _in_mix(_F32, _ENC, _DEC, 32, 0.4552),
    "dc-ae-f64c128-in-1.0": _in_mix(_F32 + (2048,), _ENC + (2,), _DEC + (2,), 128, 0.2889),
    "dc-ae-f64c128-mix-1.0": _in_mix(_F32 + (2048,), _ENC + (2,), _DEC + (2,), 128, 0.4538),
    "dc-ae-f128c512-in-1.0": _in_mix(_F32 + (2048, 2048), _ENC + (2, 2), _DEC + (2, 2), 512, 0.4883),
    "dc-ae-f128c512-mix-1.0": _in_mix(_F32 + (2048, 2048), _ENC + (2, 2), _DEC + (2, 2), 512, 0.3620),
    "dc-ae-f32c32-sana-1.0": _sana(0.41407),
    "dc-ae-f32c32-sana-1.1": _sana(0.41407),
    # Tiny layouts of the same families, for tests, demos and CPU training.
    "tiny-f32c8": _in_mix(_TINY, (0, 1, 1, 1, 1, 1), (0, 1, 1, 1, 1, 1), 8, 1.0),
    "tiny-f128c16": _in_mix(_TINY + (64, 64), (0,) + (1,) * 7, (0,) + (1,) * 7, 16, 1.0),
    "tiny-sana-f32c8": dataclasses.replace(
        _sana(1.0), encoder_widths=_TINY, decoder_widths=_TINY, encoder_depths=(1,) * 6,
        decoder_depths=(1,) * 6, latent_channels=8),
}


def get_config(name_or_config) -> DCAEConfig:
    """A preset by name, a `DCAEConfig` as is, or a dict of its fields."""
    if isinstance(name_or_config, DCAEConfig):
        return name_or_config
    if isinstance(name_or_config, dict):
        return DCAEConfig.from_dict(name_or_config)
    if name_or_config not in PRESETS:
        raise ValueError(f"unknown DC-AE preset {name_or_config!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name_or_config]
