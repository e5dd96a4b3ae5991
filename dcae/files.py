"""Writing files so that a reader never sees half of one: write a temporary file beside the target, fsync it,
rename it over the target (atomic within a folder), fsync the folder."""
import json
import os
import uuid
from pathlib import Path
from typing import Callable


def fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's entries: new names and renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the content to a temporary path in ``target``'s folder, which then replaces
    ``target`` in one step; on any error the temporary file is removed and ``target`` is left as it was."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(target.parent)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(text))


def atomic_write_json(target: Path, obj) -> None:
    atomic_write_text(target, json.dumps(obj, indent=1) + "\n")
