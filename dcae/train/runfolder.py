"""A run folder and its records, held by one writer at a time.

``.lock`` (holding the writer's pid) is locked with ``flock`` for the run's life: a second run on the same
folder is refused with the holder's pid. The kernel drops the lock when its process ends however it ends
(kill -9 included), so a lock file left by a dead process is simply taken over.
Records: ``run.json``, ``metrics.jsonl`` (one line per logged step, cut back to the checkpoint's step on
resume, so a resumed run's log equals a straight run's), ``eval.json`` (written as each entry is computed).
"""
import fcntl
import json
import os
from pathlib import Path

from ..files import atomic_write_json, atomic_write_text

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
RUN_FILE = "run.json"


class FolderInUse(ValueError):
    """Another process is writing the run folder."""


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        """Take the folder's lock (creating the folder), or raise FolderInUse naming the holder's pid."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} is a file, not a run folder")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUse(f"{self.path} is in use by another run (pid {holder}): one writer per run folder; "
                              "wait for it to end or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def write_run(self, record: dict) -> None:
        atomic_write_json(self.path / RUN_FILE, record)

    def read_evals(self) -> dict:
        path = self.path / EVAL_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def write_evals(self, evals: dict) -> None:
        atomic_write_json(self.path / EVAL_FILE, evals)

    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    def cut_metrics(self, step: int) -> None:
        """Keep only the metrics lines of steps <= ``step`` (those a resumed run will not log again); atomic."""
        path = self.metrics_path()
        if not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and _step_of(line) is not None and _step_of(line) <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def read_metrics(self) -> list[dict]:
        path = self.metrics_path()
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash
