"""Checkpoints: the whole resumable state of a run in one file, written atomically.

The file holds tensors and plain Python values only and is read with
``torch.load(weights_only=True)``: loading a checkpoint never executes code. A SHA-256 of the
file is kept beside it; a checkpoint whose digest does not match is refused, never used.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import torch

from clrun.io import write_atomic

FILE = "checkpoint/state.pt"


class CheckpointError(RuntimeError):
    pass


def save(run_dir: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = Path(run_dir) / FILE
    write_atomic(path, data)
    write_atomic(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest() + "\n")


def load(run_dir: Path, device: torch.device) -> dict | None:
    """The saved state, or None if the run has no checkpoint yet."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return None
    data = path.read_bytes()
    digest_file = path.with_suffix(".sha256")
    expected = digest_file.read_text().strip() if digest_file.exists() else None
    if expected != hashlib.sha256(data).hexdigest():
        raise CheckpointError(
            f"{path} does not match its checksum {digest_file.name}: the checkpoint is corrupted. "
            "Delete the checkpoint folder to start the run afresh."
        )
    return torch.load(io.BytesIO(data), map_location=device, weights_only=True)
