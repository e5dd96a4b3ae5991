"""Load and save DiT / U-ViT weights: our folders, diffusers DiT folders and the authors' checkpoints.

Layouts `load` reads:
- ours (`save`): ``config.json`` (the config's fields + ``_format`` / ``_format_version`` / ``_class_name``
  "DiT" | "UViT") + ``model.safetensors``.
- diffusers (DiT only): ``config.json`` with ``_class_name`` "DiTTransformer2DModel" (or "Transformer2DModel" with
  ``norm_type`` "ada_norm_zero", as facebook/DiT-XL-2-256) + ``diffusion_pytorch_model.safetensors`` (or its
  sharded index, or ``.bin``). diffusers keeps a copy of the timestep / class embedder in every block: they must
  be equal (as in converted checkpoints), the shared one is loaded.
- the authors': efficientvit's DiT / UViT (the original DiT's key layout for DiT), as a single ``.safetensors``
  or torch file (read with ``weights_only=True``; a training checkpoint, e.g. efficientvit's
  ``{"state_dict": ..., "ema": {decay: state dict}}``, is unwrapped by `pretrained.unwrap`, the EMA weights
  preferred), or a hub folder (efficientvit's
  ``DCAE_Diffusion_HF``: ``config.json`` ``{"model_name": "dc-ae-f32c32-in-1.0-dit-xl-in-512px"}`` +
  ``model.safetensors`` or ``pytorch_model.bin``). Their architecture comes from ``config=`` or is read off the
  weights' shapes, the head count from the preset of that depth and width (`DIT_PRESETS`, `UVIT_PRESETS`).

The model classes are passed in (`load`'s ``classes``; `save` takes the model), so this module imports neither
DiT nor U-ViT: a config's type says which model it builds (`CLASS_NAMES`), a class's ``config_class`` which config
it takes.
"""
import json
import re
from pathlib import Path

import safetensors.torch
import torch
from einops import rearrange

from ..files import atomic_write, atomic_write_text
from ..weights import check_state_dict, load_safetensors
from .config import PRESETS as DCAE_PRESETS
from .pretrained import (first_file, parse_config, read_diffusers_weights, read_json, read_weights, refuse_argument,
                         strip_prefixes)
from .transformer_blocks import sincos_pos_embed_2d
from .transformer_config import (DIT_PRESETS, EXTRA_TOKENS, UVIT_PRESETS, DiTConfig, TransformerConfig, UViTConfig,
                                 get_dit_config, get_uvit_config)

FORMAT = "dcae-transformer"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CLASS_NAMES = {DiTConfig: "DiT", UViTConfig: "UViT"}  # the model each config builds, as our config.json names it
DIFFUSERS_CLASS = "DiTTransformer2DModel"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release the export is tested against
# DiTTransformer2DModel's defaults, for the keys a config.json leaves out.
DIFFUSERS_DEFAULTS = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None,
                          num_layers=28, attention_bias=True, sample_size=32, patch_size=2,
                          activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
                          norm_elementwise_affine=False, norm_eps=1e-5)
DIFFUSERS_CLASS_DROPOUT = 0.1  # hard-coded in its CombinedTimestepLabelEmbeddings
# diffusers' per-block embedder copies, under transformer_blocks.<i>.norm1.emb.: ours.
DIFFUSERS_EMBEDDERS = {"timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
                       "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
                       "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
                       "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
                       "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight"}
# Per block: diffusers' name: ours (besides to_q / to_k / to_v, the thirds of our qkv).
DIFFUSERS_BLOCK = {"norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
                   "ff.net.2": "mlp.fc2"}
AUTHORS_FILES = ("model.safetensors", "pytorch_model.bin")
# Prefixes around the weights besides DDP's and torch.compile's (`read_weights` strips those): the hub model's,
# efficientvit's trainer's.
AUTHORS_PREFIXES = ("diffusion_model.", "dit.", "uvit.")
HUB_NAME = re.compile(r"^(?P<ae>dc-ae-.+?)-(?P<model>dit|uvit)-(?P<size>[a-z0-9]+)-in-(?P<res>\d+)px")


def save(model, path, format: str = "dcae") -> None:
    """Write ``model`` (DiT or UViT) to the folder ``path``: ``format="dcae"``: ``config.json`` +
    ``model.safetensors``; ``format="diffusers"`` (DiT only): a folder diffusers' `DiTTransformer2DModel` loads,
    refused for a config it cannot express. Each file is written atomically, weights first."""
    if format not in ("dcae", "diffusers"):
        raise ValueError(f"format must be 'dcae' or 'diffusers', got {format!r}")
    name = CLASS_NAMES.get(type(getattr(model, "config", None)))
    if name is None:
        raise TypeError(f"model must be a DiT or a UViT (a model with a DiTConfig or a UViTConfig), got "
                        f"{type(model).__name__}")
    if format == "diffusers" and name != "DiT":
        raise ValueError("diffusers has no U-ViT model: only a DiT can be saved with format='diffusers'")
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if format == "diffusers":
        meta = {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
                **config_to_diffusers(model.config)}
        tensors, weights = state_dict_to_diffusers(state_dict, model.config), DIFFUSERS_WEIGHTS
    else:
        meta = {"_format": FORMAT, "_format_version": FORMAT_VERSION, "_class_name": name, **model.config.to_dict()}
        tensors, weights = state_dict, WEIGHTS_FILE
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write(path / weights, lambda f: safetensors.torch.save_file(tensors, f, metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")


def load(classes, path, config=None, dtype: torch.dtype | None = None):
    """A model with the weights at ``path`` (see the module docstring), in eval mode, on the CPU, in the
    checkpoint's dtype (``dtype`` casts floating tensors). ``classes``: the model class the caller wants, or a
    tuple of those it takes (`LatentTransformer` subclasses): the one whose ``config_class`` the checkpoint's config
    is gets built, none is a ValueError. ``config``: a `DiTConfig` / `UViTConfig` (or a preset name) for the
    authors' checkpoints. Raises ValueError listing tensors that do not fit, FileNotFoundError for a missing path."""
    cls, config, state_dict = read(classes if isinstance(classes, tuple) else (classes,), path, config)
    with torch.device("meta"):
        model = cls(config)
    check_state_dict(state_dict, {k: v.shape for k, v in model.state_dict().items()}, f"{cls.__name__} weights {path}")
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.init_buffers()
    return model.eval()


def read(classes: tuple, path, config=None) -> tuple[type, TransformerConfig, dict[str, torch.Tensor]]:
    """(the one of ``classes`` the checkpoint holds, its config, its state dict in our layout); the tensors'
    shapes not yet checked against the model."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no DiT / U-ViT checkpoint at {path}")
    if path.is_file():
        return _read_authors(classes, path, config)
    meta = read_json(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else None
    if meta is None:
        raise ValueError(f"{path}: no {CONFIG_FILE}; it holds {sorted(p.name for p in path.iterdir())[:20]} (pass a "
                         "weights file to load the authors' checkpoint)")
    if meta.get("_format") == FORMAT:
        refuse_argument(path, "config", config)
        version = meta.get("_format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer version or is damaged (_format_version {version!r}, "
                             f"this code reads up to {FORMAT_VERSION})")
        config_class = next((c for c, name in CLASS_NAMES.items() if name == meta.get("_class_name")), None)
        if config_class is None:
            raise ValueError(f"{path / CONFIG_FILE}: _class_name must be one of {sorted(CLASS_NAMES.values())}, got "
                             f"{meta.get('_class_name')!r}")
        fields = {k: v for k, v in meta.items() if not k.startswith("_")}
        config = parse_config(path / CONFIG_FILE, config_class.from_dict, fields)
        return _model_class(classes, config, path), config, load_safetensors(first_file(path, (WEIGHTS_FILE,)))
    if _is_diffusers_dit(meta):
        refuse_argument(path, "config", config)
        config = parse_config(path / CONFIG_FILE, config_from_diffusers, meta)
        cls = _model_class(classes, config, path)
        return cls, config, state_dict_from_diffusers(cls, read_diffusers_weights(path), config, str(path))
    if "_class_name" in meta:
        raise ValueError(f"{path / CONFIG_FILE} describes a {meta['_class_name']}, not a DiT "
                         f"({DIFFUSERS_CLASS}, or Transformer2DModel with norm_type 'ada_norm_zero')")
    if "model_name" in meta:
        return _read_authors(classes, first_file(path, AUTHORS_FILES),
                             config if config is not None else config_from_hub_name(meta["model_name"]))
    raise ValueError(f"{path}: unknown folder layout: {CONFIG_FILE} is neither ours (_format), diffusers' "
                     f"(_class_name) nor the authors' hub model (model_name); keys: {sorted(meta)}")


def _read_authors(classes: tuple, weights: Path, config) -> tuple[type, TransformerConfig, dict[str, torch.Tensor]]:
    config, state_dict = from_authors(read_authors_weights(weights), config, str(weights))
    return _model_class(classes, config, weights), config, state_dict


def _model_class(classes: tuple, config: TransformerConfig, path: Path) -> type:
    """The one of ``classes`` that takes ``config``; a ValueError saying what ``path`` holds if none does."""
    found = next((cls for cls in classes if isinstance(config, cls.config_class)), None)
    if found is None:
        raise ValueError(f"{path} holds a {CLASS_NAMES[type(config)]}, not a "
                         f"{' or a '.join(cls.__name__ for cls in classes)}")
    return found


# ---- diffusers DiTTransformer2DModel ----

def _is_diffusers_dit(meta: dict) -> bool:
    name = meta.get("_class_name")
    return name == DIFFUSERS_CLASS or (name == "Transformer2DModel" and meta.get("norm_type") == "ada_norm_zero")


def config_to_diffusers(config: DiTConfig) -> dict:
    """`DiTTransformer2DModel`'s config for ``config``; a ValueError listing what it cannot express."""
    problems = []
    if config.timestep_freq_shift != 1:
        problems.append("timestep_freq_shift=0 (the original DiT's sinusoid): diffusers divides the exponent by "
                        "half - 1, i.e. timestep_freq_shift=1")
    if config.attention != "softmax":
        problems.append(f"attention={config.attention!r}: diffusers' DiT has softmax attention only")
    if config.ffn != "mlp" or config.mlp_ratio != 4.0:
        problems.append(f"ffn={config.ffn!r}, mlp_ratio={config.mlp_ratio}: diffusers' DiT has a GELU(tanh) MLP of "
                        "ratio 4 only")
    if config.latent_size[0] != config.latent_size[1]:
        problems.append(f"latent_size={config.latent_size}: diffusers' sample_size is square")
    if problems:
        raise ValueError("this DiT cannot be saved as a diffusers DiTTransformer2DModel: " + "; ".join(problems))
    return dict(num_attention_heads=config.heads, attention_head_dim=config.hidden_size // config.heads,
                in_channels=config.in_channels, out_channels=config.out_channels, num_layers=config.depth,
                dropout=0.0, norm_num_groups=32, attention_bias=config.qkv_bias, sample_size=config.latent_size[0],
                patch_size=config.patch_size, activation_fn="gelu-approximate",
                num_embeds_ada_norm=config.num_classes, upcast_attention=False, norm_type="ada_norm_zero",
                norm_elementwise_affine=False, norm_eps=config.mlp_norm_eps)


def config_from_diffusers(meta: dict) -> DiTConfig:
    """Our `DiTConfig` for a diffusers DiT ``config.json`` (its class dropout is fixed at 0.1)."""
    d = {**DIFFUSERS_DEFAULTS, **meta}
    for key, want in (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
                      ("norm_elementwise_affine", False)):
        if d[key] != want:
            raise ValueError(f"diffusers DiT config: {key}={d[key]!r} is not supported (only {want!r})")
    if d["num_embeds_ada_norm"] is None:
        raise ValueError("diffusers DiT config: num_embeds_ada_norm is None (a class-conditional DiT has classes)")
    out = d["out_channels"] if d["out_channels"] is not None else d["in_channels"]
    if out not in (d["in_channels"], 2 * d["in_channels"]):
        raise ValueError(f"diffusers DiT config: out_channels {out} is neither in_channels {d['in_channels']} nor "
                         "twice it (learn_sigma)")
    return DiTConfig(latent_size=d["sample_size"], in_channels=d["in_channels"],
                     hidden_size=d["num_attention_heads"] * d["attention_head_dim"], depth=d["num_layers"],
                     num_heads=d["num_attention_heads"], patch_size=d["patch_size"],
                     num_classes=d["num_embeds_ada_norm"],
                     class_dropout_prob=DIFFUSERS_CLASS_DROPOUT, learn_sigma=out == 2 * d["in_channels"],
                     qkv_bias=d["attention_bias"], timestep_freq_shift=1, mlp_norm_eps=d["norm_eps"])


def _out_rows(layout_in: str, layout_out: str, config: TransformerConfig, tensor: torch.Tensor) -> torch.Tensor:
    """A final Linear's weight / bias with its output rows reordered within a patch, e.g. "c i j" -> "i j c"."""
    p = config.patch_size
    return rearrange(tensor, f"({layout_in}) ... -> ({layout_out}) ...", i=p, j=p)


def _diffusers_renames(config: DiTConfig) -> list[tuple[str, str]]:
    """(our key, diffusers' key) of the tensors diffusers stores as they are (block 0's embedder copy for the
    shared embedders)."""
    pairs = [("x_embedder.proj.bias", "pos_embed.proj.bias")]
    pairs += [(f"final_layer.adaLN_modulation.1.{kind}", f"proj_out_1.{kind}") for kind in ("weight", "bias")]
    pairs += [(ours, f"transformer_blocks.0.norm1.emb.{theirs}") for theirs, ours in DIFFUSERS_EMBEDDERS.items()]
    pairs += [(f"blocks.{i}.{ours}.{kind}", f"transformer_blocks.{i}.{theirs}.{kind}") for i in range(config.depth)
              for theirs, ours in DIFFUSERS_BLOCK.items() for kind in ("weight", "bias")]
    return pairs


def _qkv_kinds(config: DiTConfig) -> tuple[str, ...]:
    return ("weight", "bias") if config.qkv_bias else ("weight",)


def state_dict_to_diffusers(state_dict: dict, config: DiTConfig) -> dict[str, torch.Tensor]:
    """A diffusers DiT state dict from ours: the shared embedders copied into every block, qkv split into
    to_q / to_k / to_v, the patch embedding as a conv weight, the final Linear's rows in diffusers' order."""
    p = config.patch_size
    out = {theirs: state_dict[ours] for ours, theirs in _diffusers_renames(config)}
    out["pos_embed.proj.weight"] = state_dict["x_embedder.proj.weight"].reshape(config.hidden_size, -1, p, p)
    for kind in ("weight", "bias"):
        out[f"proj_out_2.{kind}"] = _out_rows("c i j", "i j c", config, state_dict[f"final_layer.linear.{kind}"])
    for i in range(config.depth):
        for emb, ours in DIFFUSERS_EMBEDDERS.items():
            out[f"transformer_blocks.{i}.norm1.emb.{emb}"] = state_dict[ours].clone()  # files store no aliases
        for kind in _qkv_kinds(config):
            for name, part in zip(("to_q", "to_k", "to_v"), state_dict[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)):
                out[f"transformer_blocks.{i}.attn1.{name}.{kind}"] = part
    return {k: v.contiguous() for k, v in out.items()}


def state_dict_from_diffusers(cls, theirs: dict, config: DiTConfig, what: str) -> dict[str, torch.Tensor]:
    """Ours from a diffusers DiT state dict (checked by name and shape against a ``cls`` of ``config``); every
    block's embedder copies must equal block 0's."""
    expected = state_dict_to_diffusers(_shapes_as_tensors(cls, config), config)
    check_state_dict(theirs, {k: v.shape for k, v in expected.items()}, f"diffusers DiT weights {what}")
    for i in range(1, config.depth):
        for emb in DIFFUSERS_EMBEDDERS:
            key = f"transformer_blocks.{i}.norm1.emb.{emb}"
            if not torch.equal(theirs[key], theirs[f"transformer_blocks.0.norm1.emb.{emb}"]):
                raise ValueError(f"{what}: {key} differs from block 0's copy: our DiT shares one timestep / class "
                                 "embedder, so it loads only checkpoints whose per-block copies are equal (as "
                                 "converted ones are)")
    ours = {ours: theirs[key] for ours, key in _diffusers_renames(config)}
    ours["x_embedder.proj.weight"] = theirs["pos_embed.proj.weight"].reshape(config.hidden_size, -1)
    for kind in ("weight", "bias"):
        ours[f"final_layer.linear.{kind}"] = _out_rows("i j c", "c i j", config, theirs[f"proj_out_2.{kind}"])
    for i in range(config.depth):
        for kind in _qkv_kinds(config):
            ours[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([theirs[f"transformer_blocks.{i}.attn1.{name}.{kind}"]
                                                              for name in ("to_q", "to_k", "to_v")])
    return {k: v.contiguous() for k, v in ours.items()}


def _shapes_as_tensors(cls, config: TransformerConfig) -> dict[str, torch.Tensor]:
    """A ``cls(config)``'s state dict as meta tensors (shapes only)."""
    with torch.device("meta"):
        return cls(config).state_dict()


# ---- the authors' checkpoints (efficientvit, the original DiT) ----

def config_from_hub_name(name: str) -> TransformerConfig:
    """The config of an efficientvit hub model name such as "dc-ae-f32c32-in-1.0-uvit-h-in-512px"."""
    match = HUB_NAME.match(name)
    if match is None or match["ae"] not in DCAE_PRESETS:
        raise ValueError(f"unknown authors' model name {name!r}: expected dc-ae-<autoencoder>-<dit|uvit>-<size>-in-"
                         f"<resolution>px with a known autoencoder ({sorted(DCAE_PRESETS)}); pass config=")
    get = get_dit_config if match["model"] == "dit" else get_uvit_config
    return get(f"{match['model']}-{match['size']}", match["ae"], int(match["res"]))


def read_authors_weights(path: Path) -> dict[str, torch.Tensor]:
    """The named tensors of an authors' weights file (a training checkpoint unwrapped, its EMA weights preferred),
    without wrapper prefixes; the hub model's autoencoder weights (``autoencoder.*``) dropped."""
    state_dict = read_weights(path, prefer_ema=True)
    return strip_prefixes({k: v for k, v in state_dict.items() if not k.startswith("autoencoder.")}, AUTHORS_PREFIXES)


def _preset_heads(presets: dict, depth: int, hidden: int, what: str) -> int:
    heads = [h for d, w, h in presets.values() if (d, w) == (depth, hidden)]
    if not heads:
        raise ValueError(f"{what}: no preset has depth {depth} and hidden size {hidden}, so its head count is "
                         "unknown; pass config=")
    return heads[0]


def _infer_config(state_dict: dict, what: str) -> TransformerConfig:
    """The architecture of an authors' state dict from its tensors' shapes (heads from the matching preset)."""
    is_dit = "x_embedder.proj.weight" in state_dict
    embed = state_dict.get("x_embedder.proj.weight" if is_dit else "patch_embed.proj.weight")
    table = state_dict.get("y_embedder.embedding_table.weight" if is_dit else "label_emb.embedding_table.weight")
    if embed is None or embed.dim() != 4 or "pos_embed" not in state_dict or table is None:
        raise ValueError(f"{what}: not an efficientvit / original DiT or UViT state dict (looked for "
                         "x_embedder.proj / patch_embed.proj conv weights, pos_embed and the class table); "
                         f"keys: {sorted(state_dict)[:20]}")
    hidden, channels, p, _ = embed.shape
    tokens = state_dict["pos_embed"].shape[-2] - (0 if is_dit else EXTRA_TOKENS)
    side = round(tokens ** 0.5)
    if side * side != tokens:
        raise ValueError(f"{what}: {tokens} position embeddings are not a square grid; pass config=")
    if is_dit:
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        out = state_dict["final_layer.linear.weight"].shape[0] // (p * p)
        return DiTConfig(latent_size=side * p, in_channels=channels, hidden_size=hidden, depth=depth,
                         num_heads=_preset_heads(DIT_PRESETS, depth, hidden, what), patch_size=p,
                         num_classes=table.shape[0] - 1, learn_sigma=out == 2 * channels)
    depth = 2 * (1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("in_blocks.")))
    out = state_dict["decoder_pred.weight"].shape[0] // (p * p)
    return UViTConfig(latent_size=side * p, in_channels=channels, hidden_size=hidden, depth=depth,
                      num_heads=_preset_heads(UVIT_PRESETS, depth, hidden, what), patch_size=p,
                      num_classes=table.shape[0] - 1, learn_sigma=out == 2 * channels)


def from_authors(state_dict: dict, config, what: str) -> tuple[TransformerConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) of an efficientvit / original DiT or efficientvit UViT state dict. ``config``: a
    `DiTConfig` / `UViTConfig`, a preset name (on its default latents) or None (read off the weights)."""
    if isinstance(config, str):
        config = (get_dit_config if config.startswith("dit") else get_uvit_config)(config)
    if config is None:
        config = _infer_config(state_dict, what)
    ours = dict(state_dict)
    hidden = config.hidden_size
    if isinstance(config, DiTConfig):
        embed, head = "x_embedder.proj", "final_layer.linear"
        # Fixed, so not ours to load: it must be the embedding we compute (of another shape it stays, and the
        # shape check lists it with whatever else does not fit).
        if "pos_embed" in ours and ours["pos_embed"].shape[-2:] == (config.num_patches, hidden):
            _check_pos_embed(ours.pop("pos_embed"), config, what)
    elif isinstance(config, UViTConfig):
        embed, head = "patch_embed.proj", "decoder_pred"
    else:
        raise TypeError(f"config must be a DiTConfig or a UViTConfig, got {type(config).__name__}")
    if f"{embed}.weight" in ours and ours[f"{embed}.weight"].dim() == 4:  # a stride-p conv: (hidden, C, p, p)
        ours[f"{embed}.weight"] = ours[f"{embed}.weight"].flatten(1)
    for kind in ("weight", "bias"):
        key = f"{head}.{kind}"
        if key in ours and ours[key].shape[0] == config.patch_size ** 2 * config.out_channels:
            ours[key] = _out_rows("i j c", "c i j", config, ours[key]).contiguous()
    return config, ours


def _check_pos_embed(pos_embed: torch.Tensor, config: DiTConfig, what: str) -> None:
    expected = sincos_pos_embed_2d(config.hidden_size, *config.grid)
    if not torch.allclose(pos_embed.reshape(expected.shape).float(), expected, atol=1e-5):
        raise ValueError(f"{what}: pos_embed is not DiT's fixed 2-D sin-cos embedding of a {config.grid} token grid "
                         f"of width {config.hidden_size}")
