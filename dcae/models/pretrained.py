"""Load and save DC-AE weights: our folders, diffusers AutoencoderDC folders and the authors' checkpoints.

Folders `load` reads (``path`` may also be a single weights file):
- ours (`save`): ``config.json`` (DCAEConfig fields + ``_format`` / ``_format_version``) + ``model.safetensors``.
- diffusers: ``config.json`` (``_class_name`` "AutoencoderDC") + ``diffusion_pytorch_model.safetensors``
  (or its sharded ``.index.json``, or ``.bin``).
- the authors' hub repos (efficientvit ``DCAE_HF``, a PyTorchModelHubMixin): ``config.json``
  ``{"model_name": <preset>}`` + ``model.safetensors`` (or ``pytorch_model.bin``).
A single file (``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` read with ``weights_only=True``) has no
config: its layout comes from its key names and its architecture from ``preset=`` or, failing that, from the one
preset whose shapes it has.
"""
import json
import os
import uuid
from pathlib import Path

import safetensors.torch
import torch

from ..weights import torch_load
from .config import DCAEConfig, get_config
from .convert import (KeyMap, config_from_diffusers, config_to_diffusers, guess_layout, infer_preset, is_optional,
                      key_map, preset_name)

FORMAT = "dcae"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
AUTHORS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Where training checkpoints keep the weights: efficientvit's trainer saves {"state_dict", "ema": {decay: sd}, ...};
# the first of these present is used, as the authors' DCAE.load_model does with "state_dict".
WRAPPER_KEYS = ("state_dict", "ema", "model", "module", "model_state_dict")
PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, wrapper modules
DIFFUSERS_VERSION = "0.32.0"  # the first diffusers release with AutoencoderDC: the format `save` writes


def load(cls, path, preset=None, dtype: torch.dtype | None = None):
    """A ``cls`` (DCAE) model with the weights at ``path``, in eval mode, on the CPU, in the checkpoint's dtype
    (``dtype`` casts floating tensors). ``preset``: a preset name (or the authors' model name / hub id) or a
    `DCAEConfig`, for checkpoints that carry no config. Raises ValueError for tensors that do not fit, listing
    them, and FileNotFoundError for a missing path."""
    config, keymap, state_dict = read(path, preset)
    return _build(cls, config, keymap.to_ours(state_dict, what=str(path)), dtype)


def read(path, preset=None) -> tuple[DCAEConfig, KeyMap, dict[str, torch.Tensor]]:
    """(config, the checkpoint's key map, its state dict in its own layout), unchecked."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no DC-AE checkpoint at {path}")
    if path.is_file():
        return _resolve(_read_weights(path), preset, path)
    meta = json.loads((path / CONFIG_FILE).read_text()) if (path / CONFIG_FILE).is_file() else None
    if meta is not None and meta.get("_format") == FORMAT:
        _no_preset(preset, path)
        if meta["_format_version"] > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer version (format {meta['_format_version']}, this code "
                             f"reads up to {FORMAT_VERSION})")
        config = DCAEConfig.from_dict({k: v for k, v in meta.items() if not k.startswith("_")})
        return config, key_map(config, "dcae"), _read_weights(_first(path, (WEIGHTS_FILE,)))
    if meta is not None and (meta.get("_class_name") == "AutoencoderDC" or
                             ("_class_name" not in meta and "encoder_block_out_channels" in meta)):
        _no_preset(preset, path)
        config = config_from_diffusers(meta)
        return config, key_map(config, "diffusers"), _read_diffusers_weights(path)
    if meta is not None and "_class_name" in meta:
        raise ValueError(f"{path / CONFIG_FILE} describes a {meta['_class_name']}, not an AutoencoderDC")
    if meta is not None and "model_name" not in meta:
        raise ValueError(f"{path}: unknown folder layout: {CONFIG_FILE} is neither ours (_format), diffusers' "
                         f"(_class_name) nor the authors' (model_name); keys: {sorted(meta)}")
    weights = [path / name for name in AUTHORS_WEIGHTS if (path / name).is_file()]
    if not weights:
        raise ValueError(f"{path}: unknown folder layout (no {CONFIG_FILE} with weights, no {AUTHORS_WEIGHTS}); "
                         f"it holds {sorted(p.name for p in path.iterdir())[:20]}")
    return _resolve(_read_weights(weights[0]), preset if preset is not None else meta and meta["model_name"],
                    weights[0])


def _no_preset(preset, path):
    if preset is not None:
        raise ValueError(f"{path} defines its architecture in {CONFIG_FILE}: do not pass preset=")


def _first(folder: Path, names) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder}: none of {list(names)} found")


def _resolve(state_dict, preset, path) -> tuple[DCAEConfig, KeyMap, dict]:
    """The config (``preset`` or the one matching preset) and key map of a checkpoint without a config."""
    layout = guess_layout(state_dict)
    if preset is None:
        try:
            preset = infer_preset(state_dict, layout)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    config = get_config(preset_name(preset) if isinstance(preset, str) else preset)
    return config, key_map(config, layout), state_dict


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        state_dict = safetensors.torch.load_file(path)
    elif path.suffix in TORCH_SUFFIXES:
        state_dict = _unwrap(torch_load(path), path)
    else:
        raise ValueError(f"{path}: unknown weights file type {path.suffix!r} (expected .safetensors or one of "
                         f"{TORCH_SUFFIXES})")
    for prefix in PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / DIFFUSERS_INDEX).is_file():
        shards = sorted(set(json.loads((folder / DIFFUSERS_INDEX).read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in safetensors.torch.load_file(folder / shard).items()}
    return _read_weights(_first(folder, DIFFUSERS_WEIGHTS))


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    """A training checkpoint -> its state dict: {"state_dict": sd, ...}, {"ema": {decay: sd}}, {"model": sd}, ..."""
    while not _is_state_dict(obj):
        if isinstance(obj, dict) and len(obj) == 1 and not isinstance(next(iter(obj)), str):
            obj = next(iter(obj.values()))  # efficientvit's EMA: {decay: state dict}
            continue
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)
                      and obj[k]), None)
        if inner is None:
            found = sorted(map(str, obj))[:20] if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}: no state dict of tensors found (looked under {WRAPPER_KEYS}); found {found}")
        obj = inner
    return obj


def _build(cls, config: DCAEConfig, state_dict: dict[str, torch.Tensor], dtype):
    """A model built on the meta device, its tensors then taken from ``state_dict`` (no second copy)."""
    with torch.device("meta"):
        model = cls(config)
    full = dict(state_dict)
    for key, value in model.state_dict().items():
        if key not in full and is_optional(key):
            full[key] = torch.zeros(value.shape, dtype=value.dtype)
    if dtype is not None:
        full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
    model.load_state_dict(full, strict=True, assign=True)
    return model.eval()


def save(model, path, format: str = "dcae") -> None:
    """Write ``model`` to the folder ``path``: ``format="dcae"``: ``config.json`` + ``model.safetensors``;
    ``format="diffusers"``: a folder diffusers' ``AutoencoderDC.from_pretrained`` loads. Each file is written
    to a temporary file in the folder and then renamed over the target, weights first."""
    if format not in ("dcae", "diffusers"):
        raise ValueError(f"format must be 'dcae' or 'diffusers', got {format!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if format == "diffusers":
        meta = {"_class_name": "AutoencoderDC", "_diffusers_version": DIFFUSERS_VERSION,
                **config_to_diffusers(model.config)}
        tensors, weights = key_map(model.config, "diffusers").to_theirs(state_dict), DIFFUSERS_WEIGHTS[0]
    else:
        meta = {"_format": FORMAT, "_format_version": FORMAT_VERSION, **model.config.to_dict()}
        tensors, weights = key_map(model.config, "dcae").to_theirs(state_dict), WEIGHTS_FILE
    _atomic_write(path / weights, lambda f: safetensors.torch.save_file(tensors, f, metadata={"format": "pt"}))
    _atomic_write(path / CONFIG_FILE, lambda f: Path(f).write_text(json.dumps(meta, indent=2) + "\n"))


def _atomic_write(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")  # same folder, so os.replace is atomic
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
