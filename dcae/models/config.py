"""DC-AE architectures as data: `DCAEConfig` and the named presets.

Per-stage tuples run from the highest resolution (stage 0) to the lowest; the decoder tuples use the same
stage order (its stage i works at the resolution of encoder stage i).
"""
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORMS = ("rms_norm", "batch_norm")
ACTS = ("relu", "relu6", "silu", "gelu")
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "conv")
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")
# Upper bounds, far above every published DC-AE (widths <= 2048, depths <= 10, 8 stages, multi-scale kernels of
# 5), so that a junk config is refused by name instead of failing inside torch (a width of 10**12 overflows a
# tensor's storage size; a depth of 10**9 never finishes building).
MAX_WIDTH = 16384  # channels of a stage, of the latents, of the images, of an attention head
MAX_DEPTH = 256  # blocks per stage
MAX_STAGES = 12  # spatial compression up to 2**11
MAX_KERNEL = 31  # multi-scale aggregation kernel size (odd)
PER_STAGE = ("encoder_widths", "decoder_widths", "encoder_depths", "decoder_depths", "encoder_block_types",
             "decoder_block_types", "encoder_norms", "encoder_acts", "decoder_norms", "decoder_acts",
             "encoder_qkv_multiscales", "decoder_qkv_multiscales")


class ConfigError(ValueError):
    """A `DCAEConfig` field with a value that cannot build a DC-AE; ``field`` names it."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class DCAEConfig:
    """One DC-AE architecture. ``spatial_compression_ratio = 2 ** (stages - 1)``.

    Every field is checked on construction (types, ranges up to the ``MAX_*`` bounds, and that the stages fit
    together); a bad one raises `ConfigError`, a ValueError naming the field. Lists are accepted for tuples
    (as JSON gives them); an int ``scaling_factor`` becomes a float.
    """

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
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                value = tuple(value)
            if f.name.endswith("_qkv_multiscales") and isinstance(value, tuple):
                value = tuple(tuple(s) if isinstance(s, list) else s for s in value)
            object.__setattr__(self, f.name, value)
        if _is_int(self.scaling_factor):
            object.__setattr__(self, "scaling_factor", float(self.scaling_factor))
        n = len(self.encoder_widths) if isinstance(self.encoder_widths, tuple) else 0
        defaults = {"encoder_norms": ("rms_norm",) * n, "encoder_acts": ("silu",) * n,
                    "decoder_norms": ("rms_norm",) * n, "decoder_acts": ("silu",) * n,
                    "encoder_qkv_multiscales": ((),) * n, "decoder_qkv_multiscales": ((),) * n}
        for name, value in defaults.items():
            if getattr(self, name) == ():
                object.__setattr__(self, name, value)
        self.validate()

    @property
    def num_stages(self) -> int:
        return len(self.encoder_widths)

    @property
    def spatial_compression_ratio(self) -> int:
        return 2 ** (self.num_stages - 1)

    def validate(self):
        """Raise `ConfigError` for the first field that cannot build a DC-AE."""
        for name in PER_STAGE:
            if not isinstance(getattr(self, name), tuple):
                raise ConfigError(name, f"expected a list with one entry per stage, got {getattr(self, name)!r}")
        n = self.num_stages
        if not 1 <= n <= MAX_STAGES:
            raise ConfigError("encoder_widths", f"a DC-AE has 1 to {MAX_STAGES} stages, got {n}")
        for name in PER_STAGE[1:]:
            if len(getattr(self, name)) != n:
                raise ConfigError(name, f"has {len(getattr(self, name))} entries, expected one per stage ({n})")
        for name in ("encoder_widths", "decoder_widths"):
            _check_ints(name, getattr(self, name), 1, MAX_WIDTH)
        for name in ("encoder_depths", "decoder_depths"):
            _check_ints(name, getattr(self, name), 0, MAX_DEPTH)
        for name in ("latent_channels", "attention_head_dim", "in_channels"):
            _check_ints(name, (getattr(self, name),), 1, MAX_WIDTH, single=True)
        for name, allowed in (("encoder_block_types", BLOCK_TYPES), ("decoder_block_types", BLOCK_TYPES),
                              ("encoder_norms", NORMS), ("decoder_norms", NORMS), ("encoder_acts", ACTS),
                              ("decoder_acts", ACTS)):
            bad = [v for v in getattr(self, name) if not isinstance(v, str) or v not in allowed]
            if bad:
                raise ConfigError(name, f"{bad} not among {allowed}")
        for name in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            for scales in getattr(self, name):
                if not isinstance(scales, tuple) or any(not _is_int(s) or not 1 <= s <= MAX_KERNEL or s % 2 == 0
                                                        for s in scales):
                    raise ConfigError(name, f"each stage's entry must be a list of odd kernel sizes from 1 to "
                                            f"{MAX_KERNEL}, got {scales!r}")
        for name, allowed in (("downsample_block_type", DOWNSAMPLE_TYPES), ("upsample_block_type", UPSAMPLE_TYPES),
                              ("decoder_out_act", ACTS)):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("encoder_out_shortcut", "decoder_in_shortcut"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, f"must be true or false, got {getattr(self, name)!r}")
        if not (isinstance(self.scaling_factor, float) and math.isfinite(self.scaling_factor)
                and self.scaling_factor > 0):
            raise ConfigError("scaling_factor", f"must be a finite positive number, got {self.scaling_factor!r}")
        for side in ("encoder", "decoder"):
            for width, block in zip(getattr(self, f"{side}_widths"), getattr(self, f"{side}_block_types")):
                if block == "EfficientViTBlock" and width % self.attention_head_dim:
                    raise ConfigError(f"{side}_widths", f"width {width} is not a multiple of attention_head_dim "
                                                        f"({self.attention_head_dim})")
        self._check_stages_fit()

    def _check_stages_fit(self):
        """The stages chain: every stage but the first and last has blocks (a stage without blocks has no
        resampling layer), and the shortcuts' channel counts divide as the shortcut ops need."""
        n = self.num_stages
        for side in ("encoder", "decoder"):
            depths, widths = getattr(self, f"{side}_depths"), getattr(self, f"{side}_widths")
            if n == 1 and depths[0] == 0:
                raise ConfigError(f"{side}_depths", "a single stage needs blocks")
            inner = [i for i in range(1, n - 1) if depths[i] == 0]
            if inner:
                raise ConfigError(f"{side}_depths", f"stages {inner} have no blocks; only the first and last may")
            for i in range(n - 1):
                if depths[i] and (4 * widths[i]) % widths[i + 1]:
                    raise ConfigError(f"{side}_widths", f"the 2x shortcut between widths {widths[i]} and "
                                                        f"{widths[i + 1]} needs the second to divide 4x the first")
        if self.downsample_block_type == "pixel_unshuffle" and any(w % 4 for w in self.encoder_widths[1:]):
            raise ConfigError("encoder_widths", "pixel_unshuffle downsampling needs the widths after the first to "
                                                "be multiples of 4")
        if self.encoder_out_shortcut and self.encoder_widths[-1] % self.latent_channels:
            raise ConfigError("latent_channels", "the encoder's output shortcut needs latent_channels to divide "
                                                 "the last encoder width")
        if self.decoder_in_shortcut and self.decoder_widths[-1] % self.latent_channels:
            raise ConfigError("latent_channels", "the decoder's input shortcut needs latent_channels to divide "
                                                 "the last decoder width")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DCAEConfig":
        """A config from a dict of its fields (as `to_dict` or JSON gives them); ValueError for unknown or
        missing fields and for bad values."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a DCAEConfig is read from a dict of its fields, got {type(d).__name__}")
        fields = dataclasses.fields(cls)
        unknown = sorted(map(str, set(d) - {f.name for f in fields}))
        if unknown:
            raise ValueError(f"unknown DCAEConfig fields: {unknown}")
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise ValueError(f"missing DCAEConfig fields: {missing}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ints(name: str, values: tuple, low: int, high: int, single: bool = False) -> None:
    bad = [v for v in values if not _is_int(v) or not low <= v <= high]
    if bad:
        got = values[0] if single else bad
        raise ConfigError(name, f"must be {'an int' if single else 'ints'} from {low} to {high}, got {got!r}")


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
    # 4 stages (f8), 4 latent channels: 32 px digits -> 4 x 4 x 4 latents (the demo's diffusion half)
    "tiny-f8c4": _in_mix(_TINY[:4], (0, 1, 1, 1), (0, 1, 1, 1), 4, 1.0),
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
    if not isinstance(name_or_config, str):
        raise TypeError(f"a DC-AE config is a preset name, a DCAEConfig or a dict, got {type(name_or_config).__name__}")
    if name_or_config not in PRESETS:
        raise ValueError(f"unknown DC-AE preset {name_or_config!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name_or_config]
