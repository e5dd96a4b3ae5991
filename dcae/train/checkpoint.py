"""Crash-safe training checkpoints: safetensors files plus one json, written atomically and verified on load.

On-disk layout of `directory`:
    ckpt-00001000/                 one complete checkpoint per saved step (`ckpt-{step:08d}`)
        <name>.safetensors         one file per entry of `tensors` (model, ema, optimizer, discriminator, ...)
        state.json                 {"format": 1, "step": 1000, "files": {"<name>.safetensors":
                                    {"sha256": ..., "bytes": ...}}, "state": <caller's json state>}
    latest                         text file naming the newest complete checkpoint ("ckpt-00001000")
    .tmp-*                         a save in progress (removed on failure, or by the next save after a crash)
A checkpoint is written into a `.tmp-*` folder, every file fsynced, then renamed to `ckpt-*` in one step;
`latest` is replaced the same way after that, and only then are checkpoints beyond `keep_last` deleted.
One writer per directory (rank 0).
"""
import base64
import hashlib
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

from ..files import fsync

FORMAT = 1
STATE_FILE = "state.json"
LATEST_FILE = "latest"
_CKPT_NAME = re.compile(r"ckpt-(\d+)")
_FILE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or unreadable."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensors[name] holds `<name>.safetensors` (CPU), state the caller's json state."""
    path: Path
    step: int
    tensors: dict[str, dict[str, Tensor]]
    state: dict[str, Any]


def save_checkpoint(directory: str | os.PathLike, step: int, tensors: dict[str, dict[str, Tensor]],
                    state: dict[str, Any], keep_last: int | None = None) -> Path:
    """Write `ckpt-{step:08d}` atomically, point `latest` at it, then keep only the newest `keep_last`.

    tensors: {"model": model.state_dict(), "optimizer": optimizer_state_to_flat(...)[0], ...}, each saved
    to `<name>.safetensors` (on CPU, contiguous copies). state: anything json can hold (param groups,
    scheduler state, capture_rng_state(), config). Returns the checkpoint's path.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    for name in tensors:
        if not _FILE_NAME.fullmatch(name):
            raise ValueError(f"tensor group name {name!r} must match {_FILE_NAME.pattern} (it names a file)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    final = directory / f"ckpt-{step:08d}"
    tmp = _temp_path(directory, final.name)
    tmp.mkdir()
    try:
        files = {}
        for name, group in tensors.items():
            path = tmp / f"{name}.safetensors"
            cpu = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                   for k, v in group.items()}
            safetensors.torch.save_file(cpu, path)
            fsync(path)
            files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        manifest = {"format": FORMAT, "step": step, "files": files, "state": state}
        (tmp / STATE_FILE).write_text(json.dumps(manifest, indent=1))
        fsync(tmp / STATE_FILE)
        fsync(tmp)
        if final.exists():  # re-saving a step (resumed from an older checkpoint): move the old one aside
            os.replace(final, _temp_path(directory, "old-" + final.name))
        os.replace(tmp, final)
        fsync(directory)
    except BaseException:
        _remove(tmp)
        raise

    pointer = _temp_path(directory, LATEST_FILE)
    pointer.write_text(final.name + "\n")
    fsync(pointer)
    os.replace(pointer, directory / LATEST_FILE)
    fsync(directory)

    if keep_last is not None:
        older = [p for p in reversed(list_checkpoints(directory)) if p != final]
        for path in older[keep_last - 1:]:
            shutil.rmtree(path)
    for stale in directory.glob(".tmp-*"):  # a replaced checkpoint, or leftovers of a crashed save
        _remove(stale)
    return final


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (`ckpt-*` folders holding state.json) in `directory`, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir()
             if _CKPT_NAME.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_CKPT_NAME.fullmatch(p.name).group(1)))


def find_latest(directory: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names; the newest complete one when `latest` is missing or dangling; else None.
    A `latest` naming anything but a `ckpt-*` folder of `directory` (another path) is refused: CheckpointError."""
    directory = Path(directory)
    pointer = directory / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if not _CKPT_NAME.fullmatch(name):
            raise CheckpointError(f"{pointer}: names {name[:80]!r}, not a checkpoint of this folder "
                                  "(expected ckpt-<step>)")
        if (directory / name / STATE_FILE).is_file():
            return directory / name
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a `ckpt-*` folder after checking every file's byte size and sha256 against state.json.

    Tensors come back on CPU. Raises CheckpointError naming the file for a missing, truncated or
    corrupted file, or a state.json that is missing or not valid json.
    """
    path = Path(path)
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path}: missing (not a complete checkpoint)")
    try:
        manifest = json.loads(state_path.read_text())
        step, state = int(manifest["step"]), manifest["state"]
        files = {name: (int(entry["bytes"]), str(entry["sha256"])) for name, entry in manifest["files"].items()}
    except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{state_path}: unreadable checkpoint state ({type(e).__name__}: {e})") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{state_path}: format {manifest.get('format')!r}, expected {FORMAT}")

    tensors = {}
    for file_name, (expected_size, expected_sha256) in files.items():
        file = path / file_name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        size = file.stat().st_size
        if size != expected_size:
            raise CheckpointError(f"{file}: {size} bytes, expected {expected_size} (truncated or overwritten)")
        digest = _sha256(file)
        if digest != expected_sha256:
            raise CheckpointError(f"{file}: sha256 {digest}, expected {expected_sha256} (corrupted)")
        tensors[file_name.removesuffix(".safetensors")] = safetensors.torch.load_file(file)
    return Checkpoint(path=path, step=step, tensors=tensors, state=state)


def optimizer_state_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """optimizer.state_dict() -> (tensors {"<param id>.<key>": Tensor}, json {"param_groups", "state"}).

    Non-tensor per-parameter values (e.g. an int step) go to json["state"][str(param id)][key].
    """
    tensors, scalars = {}, {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"{param_id}.{key}"] = value
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": scalars}


def optimizer_state_from_flat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of optimizer_state_to_flat: a dict for optimizer.load_state_dict (tuples come back as lists)."""
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in meta["state"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng_state() -> dict[str, Any]:
    """The torch CPU, CUDA (every device, when available), numpy and python `random` states, as json.

    Byte states are base64 strings. Per process: under DDP each rank holds its own states.
    """
    np_state = np.random.get_state(legacy=True)
    return {
        "torch": _b64(torch.get_rng_state()),
        "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": np_state[0], "key": np_state[1].tolist(), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
        "python": _to_lists(random.getstate()),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set every generator capture_rng_state() recorded; CUDA states only for the devices present."""
    torch.set_rng_state(_from_b64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        cuda = [_from_b64(s) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    s = state["numpy"]
    np.random.set_state((s["bit_generator"], np.array(s["key"], dtype=np.uint32), s["pos"], s["has_gauss"],
                         s["cached_gaussian"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _b64(byte_tensor: Tensor) -> str:
    return base64.b64encode(byte_tensor.numpy().tobytes()).decode("ascii")


def _from_b64(text: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _temp_path(directory: Path, label: str) -> Path:
    """An unused `.tmp-*` name in `directory` (made here, not by tempfile, so the umask sets permissions)."""
    return directory / f".tmp-{label}-{uuid.uuid4().hex}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
