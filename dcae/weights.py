"""Reading weight files safely and checking them against a model: shared by every loader in the project.

Weights come only from local files. Pickled torch files are read with ``torch.load(weights_only=True)``, so a
file that would run code when unpickled is refused.
"""
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn


def torch_load(path: Path):
    """``torch.load(path, weights_only=True)`` on CPU. A ValueError naming the file for a pickle that could run
    code, and for a file torch cannot read (truncated or corrupt); a missing or forbidden file raises as usual."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps the unpickler's own error (kept as __context__) in advice to load with weights_only=False
        reason = _first_line(e.__context__ or e).split(" Please")[0]
        if "GLOBAL" in str(e) or "allowlisted" in str(e):
            raise ValueError(f"refusing to load {path}: it pickles objects other than tensors and plain containers, "
                             f"and unpickling those can run arbitrary code (torch.load with weights_only=True). "
                             f"{reason}") from None
        raise ValueError(f"{path} is not a readable torch file (truncated or corrupt?): {reason}") from None
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # a corrupt file fails in many ways inside torch.load: zip reader, unpickler, storages
        detail = ": ".join(filter(None, (type(e).__name__, _first_line(e))))
        raise ValueError(f"{path} is not a readable torch file (truncated or corrupt?): {detail}") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, on CPU; a ValueError naming the file for a truncated or corrupt one."""
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), "")


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The named tensors of a local .safetensors file, or of a torch file holding a flat dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} needs local weights: {path} is not a file (nothing is downloaded)")
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    state = torch_load(path)
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"{what}: {path} does not hold a flat dict of named tensors")
    return dict(state)


def check_state_dict(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], what: str,
                     optional: Callable[[str], bool] = lambda key: False, limit: int = 20) -> None:
    """Raise a ValueError listing every missing, unexpected and mis-shaped tensor (the first ``limit`` of each).
    Keys ``optional`` accepts may be absent."""
    missing = [k for k in expected if k not in state_dict and not optional(k)]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k}: {tuple(state_dict[k].shape)}, expected {tuple(expected[k])}"
                 for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{what} does not fit: {len(missing)} missing, {len(unexpected)} unexpected, "
             f"{len(misshaped)} mis-shaped tensors"]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            lines.append(f"  {label} ({len(items)}):\n    " + "\n    ".join(items[:limit]) + more)
    raise ValueError("\n".join(lines))


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients (gradients still flow to the inputs)."""
    return module.requires_grad_(False).eval()


def load_frozen(module: nn.Module, path: str | Path, what: str,
                ignore: Callable[[str], bool] = lambda key: False) -> nn.Module:
    """Every weight of ``module`` from the file, checked by name and shape (keys ``ignore`` accepts are
    dropped on both sides), then frozen."""
    state = {k: v for k, v in read_state_dict(path, what).items() if not ignore(k)}
    expected = {k: v.shape for k, v in module.state_dict().items() if not ignore(k)}
    check_state_dict(state, expected, f"{what} weights {path}")
    module.load_state_dict(state, strict=False)
    return freeze(module)
