"""Config and weight conversion between our DC-AE and the two public layouts of the same models: diffusers'
``AutoencoderDC`` and the authors' efficientvit ``DCAE`` (mit-han-lab/efficientvit, ``models/efficientvit/dc_ae.py``).

A layout is one `KeyMap`: each key of our state dict -> its key(s) in that layout and a transform kind that
knows both directions, so loading and saving cannot disagree. Key maps are built from our own model's key list
for a config (the model class, passed in, built on the meta device: no memory), so every key is accounted for.

- ``dcae``: ours, identity.
- ``diffusers``: our names, except LiteMLA's ``attn.qkv.weight`` (3C, C, 1, 1) = ``cat([to_q, to_k, to_v])``
  of three (C, C) Linear weights, and ``attn.to_out.weight`` (C, C', 1, 1) = a (C, C') Linear weight.
- ``authors``: efficientvit's module tree (``stages.{i}.op_list.{j}``, ``ResidualBlock.main``,
  ``ConvLayer.conv`` / ``.norm``, ``context_module`` / ``local_module``, ``aggreg``); same tensors, new names.

Every layout keeps BatchNorm's ``num_batches_tracked`` under its own name; it is optional on load (it only
matters for training with ``momentum=None``): a checkpoint without it loads, and the counter stays 0.
"""
import dataclasses
import functools
import re
import warnings
from typing import Mapping, NamedTuple

import torch
from torch import nn

from ..weights import check_state_dict
from .config import BLOCK_TYPES, PRESETS, ConfigError, DCAEConfig, get_config

LAYOUTS = ("dcae", "diffusers", "authors")
OPTIONAL_SUFFIX = ".num_batches_tracked"


# ---------------------------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------------------------

class Rule(NamedTuple):
    """Our key -> their key(s). kind: ``copy`` (same tensor), ``linear`` (our (O, I, 1, 1) conv <-> their (O, I)
    Linear), ``qkv`` (our (3C, C, 1, 1) conv <-> their three (C, C) Linears, in row order)."""
    ours: str
    theirs: tuple[str, ...]
    kind: str = "copy"


def _to_theirs(kind: str, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if kind == "copy":
        return (t,)
    if kind == "linear":
        return (t.flatten(1),)
    return tuple(part.flatten(1).clone() for part in t.chunk(3))  # separate storage: safetensors refuses shared


def _to_ours(kind: str, parts: tuple[torch.Tensor, ...], shape: torch.Size) -> torch.Tensor:
    return parts[0] if kind == "copy" else torch.cat(parts).reshape(shape)


def is_optional(key: str) -> bool:
    """Keys a checkpoint may omit (BatchNorm's step counter)."""
    return key.endswith(OPTIONAL_SUFFIX)


@functools.lru_cache(maxsize=None)
def our_shapes(model_cls: type[nn.Module], config: DCAEConfig) -> dict[str, torch.Size]:
    """The state dict's keys and shapes of ``model_cls(config)`` (DCAE), from a meta-device model (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    return {k: v.shape for k, v in model.state_dict().items()}


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """One layout of one config: ``rules`` cover our every key; ``shapes`` are our shapes."""

    layout: str
    rules: tuple[Rule, ...]
    shapes: Mapping[str, torch.Size]

    @functools.cached_property
    def their_shapes(self) -> dict[str, torch.Size]:
        out = {}
        for rule in self.rules:
            meta = torch.empty(self.shapes[rule.ours], device="meta")
            out.update((key, t.shape) for key, t in zip(rule.theirs, _to_theirs(rule.kind, meta)))
        return out

    def to_theirs(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our state dict -> this layout's (checked first)."""
        check_state_dict(state_dict, self.shapes, "the model's state dict", optional=is_optional)
        out = {}
        for rule in self.rules:
            if rule.ours in state_dict:
                out.update(zip(rule.theirs, _to_theirs(rule.kind, state_dict[rule.ours])))
        return out

    def to_ours(self, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint") -> dict[str, torch.Tensor]:
        """This layout's state dict -> ours (checked first, in this layout's names)."""
        check_state_dict(state_dict, self.their_shapes, f"{what} ({self.layout} layout)", optional=is_optional)
        return {rule.ours: _to_ours(rule.kind, tuple(state_dict[k] for k in rule.theirs), self.shapes[rule.ours])
                for rule in self.rules if all(k in state_dict for k in rule.theirs)}

    def matches(self, state_dict: Mapping[str, torch.Tensor]) -> bool:
        """Same keys (optional ones aside) and shapes."""
        try:
            check_state_dict(state_dict, self.their_shapes, "", optional=is_optional, limit=0)
        except ValueError:
            return False
        return True


def key_map(model_cls: type[nn.Module], config, layout: str) -> KeyMap:
    """The `KeyMap` of ``layout`` ("dcae" | "diffusers" | "authors") for ``model_cls`` (DCAE) of a config or
    preset name."""
    config = get_config(config)
    if layout == "authors":
        check_authors_expressible(config)
    shapes = our_shapes(model_cls, config)
    rule = {"dcae": lambda k: Rule(k, (k,)), "diffusers": _diffusers_rule,
            "authors": lambda k: Rule(k, (_authors_key(config, k),))}
    if layout not in rule:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return KeyMap(layout, tuple(rule[layout](k) for k in shapes), shapes)


# ---------------------------------------------------------------------------------------------------------------
# diffusers AutoencoderDC
# ---------------------------------------------------------------------------------------------------------------

def _diffusers_rule(key: str) -> Rule:
    if key.endswith(".attn.qkv.weight"):
        parent = key[: -len("qkv.weight")]
        return Rule(key, tuple(f"{parent}to_{x}.weight" for x in "qkv"), "qkv")
    if key.endswith(".attn.to_out.weight"):
        return Rule(key, (key,), "linear")
    return Rule(key, (key,))


# AutoencoderDC.__init__'s defaults (unchanged from diffusers 0.32, where it appeared, to 0.42); a test checks them.
DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32,
    "encoder_block_types": "ResBlock", "decoder_block_types": "ResBlock",
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3), "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "upsample_block_type": "pixel_shuffle", "downsample_block_type": "pixel_unshuffle",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu",
    "encoder_out_shortcut": True, "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu",
    "scaling_factor": 1.0,
}
# diffusers' get_activation (lower-cased name) -> ours; its "mish" has no counterpart here.
_ACT_FROM_DIFFUSERS = {"relu": "relu", "silu": "silu", "swish": "silu", "gelu": "gelu"}
_ACT_TO_DIFFUSERS = {"relu": "relu", "silu": "silu", "gelu": "gelu"}  # no ReLU6 in get_activation
_DIFFUSERS_NORMS = ("rms_norm", "batch_norm")  # its "layer_norm" normalises the wrong axis of NCHW


# Our DCAEConfig field -> the AutoencoderDC config key it comes from (for error messages).
_DIFFUSERS_NAMES = {
    "encoder_widths": "encoder_block_out_channels", "decoder_widths": "decoder_block_out_channels",
    "encoder_depths": "encoder_layers_per_block", "decoder_depths": "decoder_layers_per_block",
    "decoder_norms": "decoder_norm_types", "decoder_acts": "decoder_act_fns", "decoder_out_act": "decoder_conv_act_fn",
}


def _per_stage(c: Mapping, field: str, n: int | None = None) -> tuple:
    """A per-stage AutoencoderDC setting as a tuple; a string (with ``n``) applies to every stage."""
    value = c[field]
    if isinstance(value, str) and n is not None:
        return (value,) * n
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"diffusers config {field}: expected a list{' or a string' if n is not None else ''}, "
                         f"got {value!r}")
    return tuple(value)


def _act_from_diffusers(name: str, field: str) -> str:
    if not isinstance(name, str) or name.lower() not in _ACT_FROM_DIFFUSERS:
        raise ValueError(f"diffusers config {field}: activation {name!r} cannot be expressed here "
                         f"(supported: {sorted(_ACT_FROM_DIFFUSERS)})")
    return _ACT_FROM_DIFFUSERS[name.lower()]


def config_from_diffusers(d: Mapping) -> DCAEConfig:
    """An AutoencoderDC config (config.json dict; absent keys take diffusers' defaults) -> `DCAEConfig`.

    Read as diffusers builds it: encoder stages always use rms_norm + silu; ``downsample_block_type`` other
    than "pixel_unshuffle" is a stride-2 conv; ``upsample_block_type`` other than "interpolate" is
    pixel_shuffle; a string for a per-stage field applies to every stage. Settings we cannot express raise.
    """
    if not isinstance(d, Mapping):
        raise ValueError(f"a diffusers config is a JSON object, got {type(d).__name__}")
    unknown = sorted(str(k) for k in d if not str(k).startswith("_") and k not in DIFFUSERS_DEFAULTS)
    if unknown:
        warnings.warn(f"ignoring AutoencoderDC config keys that diffusers' AutoencoderDC does not take: {unknown}")
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in d.items() if k in DIFFUSERS_DEFAULTS}}
    enc_widths, dec_widths = _per_stage(c, "encoder_block_out_channels"), _per_stage(c, "decoder_block_out_channels")
    n_enc, n_dec = len(enc_widths), len(dec_widths)
    blocks = {side: _per_stage(c, f"{side}_block_types", n) for side, n in (("encoder", n_enc), ("decoder", n_dec))}
    for side, types in blocks.items():
        bad = [t for t in types if not isinstance(t, str) or t not in BLOCK_TYPES]
        if bad:
            raise ValueError(f"diffusers config {side}_block_types: {bad} not among {BLOCK_TYPES}")
    norms = _per_stage(c, "decoder_norm_types", n_dec)
    bad = [t for t in norms if not isinstance(t, str) or t not in _DIFFUSERS_NORMS]
    if bad:
        raise ValueError(f"diffusers config decoder_norm_types: {bad} cannot be expressed (supported: "
                         f"{_DIFFUSERS_NORMS})")
    acts = tuple(_act_from_diffusers(a, "decoder_act_fns") for a in _per_stage(c, "decoder_act_fns", n_dec))
    try:
        return DCAEConfig(
            encoder_widths=enc_widths, decoder_widths=dec_widths,
            encoder_depths=_per_stage(c, "encoder_layers_per_block"),
            decoder_depths=_per_stage(c, "decoder_layers_per_block"),
            encoder_block_types=blocks["encoder"], decoder_block_types=blocks["decoder"],
            latent_channels=c["latent_channels"], encoder_norms=("rms_norm",) * n_enc, encoder_acts=("silu",) * n_enc,
            decoder_norms=norms, decoder_acts=acts,
            encoder_qkv_multiscales=_per_stage(c, "encoder_qkv_multiscales"),
            decoder_qkv_multiscales=_per_stage(c, "decoder_qkv_multiscales"),
            downsample_block_type="pixel_unshuffle" if c["downsample_block_type"] == "pixel_unshuffle" else "conv",
            upsample_block_type="interpolate" if c["upsample_block_type"] == "interpolate" else "pixel_shuffle",
            encoder_out_shortcut=c["encoder_out_shortcut"], decoder_in_shortcut=c["decoder_in_shortcut"],
            decoder_out_act=_act_from_diffusers(c["decoder_conv_act_fn"], "decoder_conv_act_fn"),
            attention_head_dim=c["attention_head_dim"], in_channels=c["in_channels"],
            scaling_factor=c["scaling_factor"])
    except ConfigError as e:
        raise ValueError(f"diffusers config {_DIFFUSERS_NAMES.get(e.field, e.field)}: {e.problem}") from None


def config_to_diffusers(config) -> dict:
    """A `DCAEConfig` (or preset name) -> AutoencoderDC's init kwargs (lists, as its config.json holds them).
    Raises for what AutoencoderDC cannot build: encoder norms/acts other than rms_norm/silu, ReLU6."""
    cfg = get_config(config)
    problems = []
    if set(cfg.encoder_norms) != {"rms_norm"} or set(cfg.encoder_acts) != {"silu"}:
        problems.append(f"its encoder is always rms_norm + silu (got {cfg.encoder_norms}, {cfg.encoder_acts})")
    for field, acts in (("decoder_acts", cfg.decoder_acts), ("decoder_out_act", (cfg.decoder_out_act,))):
        bad = sorted(set(acts) - set(_ACT_TO_DIFFUSERS))
        if bad:
            problems.append(f"{field}: get_activation has no {bad}")
    if problems:
        raise ValueError("this DCAEConfig cannot be expressed as a diffusers AutoencoderDC: " + "; ".join(problems))
    return {
        "in_channels": cfg.in_channels, "latent_channels": cfg.latent_channels,
        "attention_head_dim": cfg.attention_head_dim,
        "encoder_block_types": list(cfg.encoder_block_types), "decoder_block_types": list(cfg.decoder_block_types),
        "encoder_block_out_channels": list(cfg.encoder_widths), "decoder_block_out_channels": list(cfg.decoder_widths),
        "encoder_layers_per_block": list(cfg.encoder_depths), "decoder_layers_per_block": list(cfg.decoder_depths),
        "encoder_qkv_multiscales": [list(s) for s in cfg.encoder_qkv_multiscales],
        "decoder_qkv_multiscales": [list(s) for s in cfg.decoder_qkv_multiscales],
        "upsample_block_type": cfg.upsample_block_type, "downsample_block_type": cfg.downsample_block_type,
        "decoder_norm_types": list(cfg.decoder_norms),
        "decoder_act_fns": [_ACT_TO_DIFFUSERS[a] for a in cfg.decoder_acts],
        "encoder_out_shortcut": cfg.encoder_out_shortcut, "decoder_in_shortcut": cfg.decoder_in_shortcut,
        "decoder_conv_act_fn": _ACT_TO_DIFFUSERS[cfg.decoder_out_act], "scaling_factor": cfg.scaling_factor,
    }


# ---------------------------------------------------------------------------------------------------------------
# The authors' efficientvit DCAE
# ---------------------------------------------------------------------------------------------------------------

# Model names in mit-han-lab/efficientvit's ae_model_zoo (and their hub repos): our presets of the same name.
AUTHORS_MODEL_NAMES = tuple(name for name in PRESETS if name.startswith("dc-ae-"))

# Inside one block (ResBlock, then EfficientViTBlock): our relative prefix -> the authors'. Their blocks are
# ResidualBlock(main, IdentityLayer()); ConvLayer holds .conv (and .norm); LiteMLA's convs are .qkv and .proj.
_AUTHORS_BLOCK = (
    ("conv1.", "main.conv1.conv."), ("conv2.", "main.conv2.conv."), ("norm.", "main.conv2.norm."),
    ("attn.qkv.", "context_module.main.qkv.conv."),
    ("attn.to_out.", "context_module.main.proj.conv."),
    ("attn.norm_out.", "context_module.main.proj.norm."),
    ("conv_out.conv_inverted.", "local_module.main.inverted_conv.conv."),
    ("conv_out.conv_depth.", "local_module.main.depth_conv.conv."),
    ("conv_out.conv_point.", "local_module.main.point_conv.conv."),
    ("conv_out.norm.", "local_module.main.point_conv.norm."),
)
# LiteMLA.aggreg[k] = Sequential(depthwise s x s conv, grouped 1x1 conv).
_MULTISCALE = re.compile(r"attn\.to_qkv_multiscale\.(\d+)\.proj_(in|out)\.(.+)")
_STAGE = re.compile(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(\d+)\.(.+)")


def _authors_block_key(rest: str) -> str:
    if m := _MULTISCALE.fullmatch(rest):
        return f"context_module.main.aggreg.{m[1]}.{0 if m[2] == 'in' else 1}.{m[3]}"
    for ours, theirs in _AUTHORS_BLOCK:
        if rest.startswith(ours):
            return theirs + rest[len(ours):]
    raise KeyError(rest)


def _authors_key(cfg: DCAEConfig, key: str) -> str:
    """Our key -> the authors' key for ``cfg`` (their DownBlock/UpBlock wrap the conv in one more ConvLayer,
    except the stride-2 "Conv" downsample, which is a ConvLayer itself)."""
    unshuffle = "conv." if cfg.downsample_block_type == "pixel_unshuffle" else ""
    if m := _STAGE.fullmatch(key):
        side, i, j, rest = m[1], int(m[2]), int(m[3]), m[4]
        prefix = f"{side}.stages.{i}.op_list.{j}."
        if side == "encoder" and j == cfg.encoder_depths[i]:  # the stage's closing downsample
            return f"{prefix}main.{unshuffle}{rest}"
        if side == "decoder" and j == 0 and i < cfg.num_stages - 1:  # the stage's opening upsample
            return f"{prefix}main.conv.{rest}"
        return prefix + _authors_block_key(rest)
    top = {
        "encoder.conv_in.": ("encoder.project_in.conv." if cfg.encoder_depths[0] > 0
                             else f"encoder.project_in.{unshuffle}"),
        "encoder.conv_out.": "encoder.project_out." + ("main." if cfg.encoder_out_shortcut else "") + "op_list.0.conv.",
        "decoder.conv_in.": "decoder.project_in." + ("main." if cfg.decoder_in_shortcut else "") + "conv.",
        "decoder.norm_out.": "decoder.project_out.op_list.0.",  # op_list = [norm, act, conv or upsample]
        "decoder.conv_out.": "decoder.project_out.op_list.2.conv.",
    }
    for ours, theirs in top.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    raise KeyError(f"no authors' name for {key!r}")


def check_authors_expressible(cfg: DCAEConfig) -> None:
    """Raise for a config the authors' DCAE cannot build the same way (its dc_ae.py: blocks "ResBlock",
    "EViT_GLU" (scales ()), "EViTS5_GLU" (scales (5,)), head dim 32, one norm and act for the whole encoder,
    GLUMBConv normalised with the stage's norm, GELU with the tanh approximation)."""
    problems = []
    if cfg.attention_head_dim != 32:
        problems.append(f"attention_head_dim {cfg.attention_head_dim} (theirs is 32)")
    if len(set(cfg.encoder_norms)) > 1 or len(set(cfg.encoder_acts)) > 1:
        problems.append("encoder norms/acts differ between stages (theirs are one setting)")
    if "gelu" in {*cfg.encoder_acts, *cfg.decoder_acts, cfg.decoder_out_act}:
        problems.append("gelu (theirs is GELU(approximate='tanh'))")
    for side in ("encoder", "decoder"):
        for i, block in enumerate(getattr(cfg, f"{side}_block_types")):
            scales, norm = getattr(cfg, f"{side}_qkv_multiscales")[i], getattr(cfg, f"{side}_norms")[i]
            if block == "EfficientViTBlock" and scales not in ((), (5,)):
                problems.append(f"{side} stage {i}: qkv multiscales {scales} (theirs: () or (5,))")
            if block == "EfficientViTBlock" and norm != "rms_norm":
                problems.append(f"{side} stage {i}: EfficientViTBlock with {norm} (their GLUMBConv would use it too)")
    if problems:
        raise ValueError("this DCAEConfig has no authors' (efficientvit) equivalent: " + "; ".join(problems))


def preset_name(name: str) -> str:
    """A preset name, an authors' model name or hub repo id -> our preset name, e.g.
    "mit-han-lab/dc-ae-f32c32-in-1.0-diffusers" -> "dc-ae-f32c32-in-1.0"."""
    if not isinstance(name, str):
        raise ValueError(f"a DC-AE model name is a string, got {name!r}")
    base = name.rsplit("/", 1)[-1]
    base = base[: -len("-diffusers")] if base.endswith("-diffusers") else base
    if base not in PRESETS:
        raise ValueError(f"unknown DC-AE model {name!r}; presets: {sorted(PRESETS)}")
    return base


# ---------------------------------------------------------------------------------------------------------------
# Telling layouts and presets apart
# ---------------------------------------------------------------------------------------------------------------

_AUTHORS_ROOTS = ("encoder.stages.", "encoder.project_", "decoder.stages.", "decoder.project_")


def guess_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """"authors" (efficientvit names), "diffusers" (split to_q/to_k/to_v) or "dcae", from the key names."""
    if any(k.startswith(_AUTHORS_ROOTS) for k in state_dict):
        return "authors"
    if any(k.endswith(".attn.to_q.weight") for k in state_dict):
        return "diffusers"
    return "dcae"


def match_presets(model_cls: type[nn.Module], state_dict: Mapping[str, torch.Tensor], layout: str) -> list[str]:
    """The presets whose ``layout`` key map (for ``model_cls``) fits ``state_dict`` exactly (keys and shapes)."""
    names = []
    for name, cfg in PRESETS.items():
        try:
            if key_map(model_cls, cfg, layout).matches(state_dict):
                names.append(name)
        except ValueError:  # a preset this layout cannot express
            continue
    return names


def infer_preset(model_cls: type[nn.Module], state_dict: Mapping[str, torch.Tensor], layout: str) -> str:
    """The one preset whose shapes (for ``model_cls``) ``state_dict`` has, or a ValueError naming the candidates."""
    names = match_presets(model_cls, state_dict, layout)
    if len(names) == 1:
        return names[0]
    if names:
        differ = sorted({f.name for f in dataclasses.fields(DCAEConfig)
                         if len({getattr(PRESETS[n], f.name) for n in names}) > 1})
        raise ValueError(f"the checkpoint's tensors fit several presets {names} (they differ only in {differ}); "
                         "pass preset= to choose")
    raise ValueError(f"the checkpoint's tensors ({layout} layout) fit no preset; pass preset= (a name or a "
                     f"DCAEConfig). Presets: {sorted(PRESETS)}")
