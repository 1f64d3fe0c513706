"""Atomic file writes (a temporary name in the same folder, then rename) and the config-key
plumbing that the runner, the CLI and the reports share. Imports no torch: ``clrun-report`` stays
quick."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from clrun.errors import OutputError

# Top-level keys that do not change a run's results: they may differ between a run and its
# resumption, and a sweep job is identified by its other overrides.
RUN_MANAGEMENT_KEYS = (
    "resume",
    "threads",
    "deterministic",
    "data_dir",
    "checkpoint",
    "logger",
    "plots",
    "optimize",
    "distributed",
)


_writer = True  # False in the processes of a distributed run but rank 0 (clrun.distributed)


def set_writer(on: bool) -> None:
    """Whether this process writes the run's files: in a group of processes only rank 0 does."""
    global _writer
    _writer = on


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all; a failure (permissions, a full disk) is an
    :class:`~clrun.errors.OutputError` naming the file. A process that is not the writer of a
    distributed run writes nothing."""
    if not _writer:
        return
    path = Path(path)
    try:
        _write_atomic(path, data)
    except OSError as e:
        raise OutputError(
            f"cannot write {path}: {e.strerror or e}; free some space or choose a writable "
            "run directory (hydra.run.dir=...)"
        ) from e


def _write_atomic(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for others to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}: config keys as a user writes them on the command line."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def top_key(override: str) -> str:
    """``+strategy.alpha=2`` → ``strategy``: the top-level key of a command-line override."""
    return override.split("=", 1)[0].lstrip("+~").split(".")[0].split("/")[0]
