"""Load and save DC-AE weights: our folders, diffusers AutoencoderDC folders and the authors' checkpoints.

Folders `load` reads (``path`` may also be a single weights file):
- ours (`save`): ``config.json`` (DCAEConfig fields + ``_format`` / ``_format_version``) + ``model.safetensors``.
- diffusers: ``config.json`` (``_class_name`` "AutoencoderDC") + ``diffusion_pytorch_model.safetensors``
  (or its sharded ``.index.json``, or ``.bin``).
- the authors' hub repos (efficientvit ``DCAE_HF``, a PyTorchModelHubMixin): ``config.json``
  ``{"model_name": <preset>}`` + ``model.safetensors`` (or ``pytorch_model.bin``).
- a trainer's run folder (``dcae train-ae --out``): its exported ``model/``, one of ours.
A single file (``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` read with ``weights_only=True``) has no
config: its layout comes from its key names and its architecture from ``preset=`` or, failing that, from the one
preset whose shapes it has.

Every bad file or folder raises FileNotFoundError (nothing at ``path``) or ValueError naming the file: unreadable
or truncated weights, JSON that is not an object, config values that cannot build a DC-AE, shard names in a
sharded index that leave the folder (they must be plain file names in it), wrappers nested more than
``MAX_WRAPPER_DEPTH`` levels (a self-referential checkpoint), tensors that do not fit.

The model class is passed in (``cls``, or the saved model's type), so this module does not import the model.
Its public folder and weight-file helpers (`read_json`, `parse_config`, `refuse_argument`, `first_file`,
`read_weights`, `strip_prefixes`, `read_diffusers_weights`) serve the DiT / U-ViT loader too.
"""
import json
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..files import atomic_write, atomic_write_text
from ..weights import load_safetensors, torch_load
from .config import DCAEConfig, get_config
from .convert import (KeyMap, config_from_diffusers, config_to_diffusers, guess_layout, infer_preset, is_optional,
                      key_map, preset_name)

RUN_MODEL = "model"  # where a trainer's run folder keeps its exported model
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
MAX_WRAPPER_DEPTH = 8  # wrappers unwrapped before giving up (the deepest known, {"ema": {decay: sd}}, is 2)
PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, wrapper modules
DIFFUSERS_VERSION = "0.32.0"  # the first diffusers release with AutoencoderDC: the format `save` writes


def load(cls, path, preset=None, dtype: torch.dtype | None = None):
    """A ``cls`` (DCAE) model with the weights at ``path``, in eval mode, on the CPU, in the checkpoint's dtype
    (``dtype`` casts floating tensors). ``preset``: a preset name (or the authors' model name / hub id) or a
    `DCAEConfig`, for checkpoints that carry no config. Raises ValueError for a bad file or folder and for
    tensors that do not fit, listing them, and FileNotFoundError for a missing path."""
    config, keymap, state_dict = read(cls, path, preset)
    return _build(cls, config, keymap.to_ours(state_dict, what=str(path)), dtype)


def read(cls, path, preset=None) -> tuple[DCAEConfig, KeyMap, dict[str, torch.Tensor]]:
    """(config, the checkpoint's key map for ``cls``, its state dict in its own layout); tensors unchecked."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no DC-AE checkpoint at {path}")
    if path.is_file():
        return _resolve(cls, read_weights(path), preset, path)
    if not path.is_dir():
        raise ValueError(f"{path} is neither a weights file nor a folder")
    if not (path / CONFIG_FILE).is_file() and (path / RUN_MODEL / CONFIG_FILE).is_file():
        path = path / RUN_MODEL  # a trainer's run folder: its exported model
    config_file = path / CONFIG_FILE
    meta = read_json(config_file) if config_file.is_file() else None
    if meta is not None and meta.get("_format") == FORMAT:
        refuse_argument(path, "preset", preset)
        version = meta.get("_format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{config_file}: _format_version must be a positive int, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer version (format {version}, this code reads up to "
                             f"{FORMAT_VERSION})")
        config = parse_config(config_file, DCAEConfig.from_dict,
                              {k: v for k, v in meta.items() if not k.startswith("_")})
        return config, key_map(cls, config, "dcae"), read_weights(first_file(path, (WEIGHTS_FILE,)))
    if meta is not None and (meta.get("_class_name") == "AutoencoderDC" or
                             ("_class_name" not in meta and "encoder_block_out_channels" in meta)):
        refuse_argument(path, "preset", preset)
        config = parse_config(config_file, config_from_diffusers, meta)
        return config, key_map(cls, config, "diffusers"), read_diffusers_weights(path)
    if meta is not None and "_class_name" in meta:
        raise ValueError(f"{config_file} describes a {meta['_class_name']!r}, not an AutoencoderDC")
    if meta is not None and "model_name" not in meta:
        raise ValueError(f"{path}: unknown folder layout: {CONFIG_FILE} is neither ours (_format), diffusers' "
                         f"(_class_name) nor the authors' (model_name); keys: {sorted(meta)[:20]}")
    if meta is not None and not isinstance(meta["model_name"], str):
        raise ValueError(f"{config_file}: model_name must be a preset name, got {meta['model_name']!r}")
    weights = [path / name for name in AUTHORS_WEIGHTS if (path / name).is_file()]
    if not weights:
        raise ValueError(f"{path}: unknown folder layout (no {CONFIG_FILE} with weights, no {AUTHORS_WEIGHTS}); "
                         f"it holds {sorted(p.name for p in path.iterdir())[:20]}")
    return _resolve(cls, read_weights(weights[0]), preset if preset is not None else meta and meta["model_name"],
                    weights[0])


def read_json(path: Path) -> dict:
    """A JSON file holding an object; ValueError naming the file otherwise."""
    try:
        value = json.loads(path.read_bytes())
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def parse_config(config_file: Path, parse, meta: dict):
    """``parse(meta)``, its errors (missing or ill-typed fields, values no model can have) as ValueErrors naming
    ``config_file``."""
    try:
        return parse(meta)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: {e}") from None


def refuse_argument(path: Path, name: str, value) -> None:
    """A ValueError unless ``value`` (the architecture argument ``name``) is None: ``path`` defines its own."""
    if value is not None:
        raise ValueError(f"{path} defines its architecture in {CONFIG_FILE}: do not pass {name}=")


def first_file(folder: Path, names) -> Path:
    """The first of ``names`` that is a file in ``folder``; a ValueError if none is."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ValueError(f"{folder}: none of {list(names)} found")


def _resolve(cls, state_dict, preset, path) -> tuple[DCAEConfig, KeyMap, dict]:
    """The config (``preset`` or the one matching preset) and key map of a checkpoint without a config."""
    layout = guess_layout(state_dict)
    if preset is None:
        try:
            preset = infer_preset(cls, state_dict, layout)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    config = get_config(preset_name(preset) if isinstance(preset, str) else preset)
    return config, key_map(cls, config, layout), state_dict


def read_weights(path: Path, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """The named tensors of a .safetensors or torch file (a training checkpoint unwrapped, see `unwrap`), without
    the wrapper prefixes ``PREFIXES``."""
    if path.suffix == ".safetensors":
        state_dict = load_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        state_dict = unwrap(torch_load(path), path, prefer_ema)
    else:
        raise ValueError(f"{path}: unknown weights file type {path.suffix!r} (expected .safetensors or one of "
                         f"{TORCH_SUFFIXES})")
    return strip_prefixes(state_dict, PREFIXES)


def strip_prefixes(state_dict: dict[str, torch.Tensor], prefixes) -> dict[str, torch.Tensor]:
    """Each of ``prefixes`` in turn removed from the keys if every key has it."""
    for prefix in prefixes:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / DIFFUSERS_INDEX
    if not index.is_file():
        return read_weights(first_file(folder, DIFFUSERS_WEIGHTS))
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no weight_map (a JSON object of tensor name -> shard file name)")
    shards = [_shard(folder, index, name) for name in sorted(set(weight_map.values()))]
    return {k: v for shard in shards for k, v in load_safetensors(shard).items()}


def _shard(folder: Path, index: Path, name: str) -> Path:
    """A shard named in ``index``: a plain file name in ``folder`` (a path that could leave it is refused)."""
    if not name or name in (".", "..") or Path(name).name != name:
        raise ValueError(f"{index}: shard {name!r} is not a file name inside {folder} (refusing to read elsewhere)")
    if not (folder / name).is_file():
        raise FileNotFoundError(f"{index} names the shard {name!r}, which is not a file in {folder}")
    return folder / name


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def unwrap(obj, path: Path, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """A training checkpoint -> its state dict: {"state_dict": sd, ...}, {"ema": {decay: sd}}, {"model": sd}, ...,
    at most MAX_WRAPPER_DEPTH levels deep; the first of WRAPPER_KEYS present is used, "ema" first if
    ``prefer_ema``."""
    keys = sorted(WRAPPER_KEYS, key=lambda k: k != "ema") if prefer_ema else WRAPPER_KEYS
    for _ in range(MAX_WRAPPER_DEPTH + 1):
        if _is_state_dict(obj):
            return obj
        if isinstance(obj, dict) and len(obj) == 1 and not isinstance(next(iter(obj)), str):
            obj = next(iter(obj.values()))  # efficientvit's EMA: {decay: state dict}
            continue
        inner = next((obj[k] for k in keys if isinstance(obj, dict) and isinstance(obj.get(k), dict) and obj[k]),
                     None)
        if inner is None:
            found = sorted(map(str, obj))[:20] if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}: no state dict of tensors found (looked under {WRAPPER_KEYS}); found {found}")
        obj = inner
    raise ValueError(f"{path}: no state dict of tensors within {MAX_WRAPPER_DEPTH} levels of wrappers "
                     f"(looked under {WRAPPER_KEYS}; a self-referential or absurdly nested checkpoint)")


def _build(cls, config: DCAEConfig, state_dict: dict[str, torch.Tensor], dtype):
    """A model built on the meta device, its tensors then taken from ``state_dict`` (no second copy)."""
    with torch.device("meta"):
        model = cls(config)
    full = dict(state_dict)
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in full and is_optional(key):
            full[key] = torch.zeros(value.shape, dtype=value.dtype)
    bad = [f"{k}: {v.dtype} {v.layout} on {v.device.type}" for k, v in full.items()
           if v.is_floating_point() != expected[k].is_floating_point() or v.layout != torch.strided
           or v.device.type != "cpu"]
    if bad:
        raise ValueError(f"{len(bad)} tensors are not dense CPU tensors of the expected kind (floating-point "
                         f"weights, integer counters): {bad[:5]}")
    if dtype is not None:
        full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
    model.load_state_dict(full, strict=True, assign=True)
    return model.eval()


def save(model: nn.Module, path, format: str = "dcae") -> None:
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
        tensors = key_map(type(model), model.config, "diffusers").to_theirs(state_dict)
        weights = DIFFUSERS_WEIGHTS[0]
    else:
        meta = {"_format": FORMAT, "_format_version": FORMAT_VERSION, **model.config.to_dict()}
        tensors, weights = key_map(type(model), model.config, "dcae").to_theirs(state_dict), WEIGHTS_FILE
    atomic_write(path / weights, lambda f: safetensors.torch.save_file(tensors, f, metadata={"format": "pt"}))
    atomic_write_text(path / CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
