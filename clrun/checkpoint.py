"""Checkpoints: the whole resumable state of a run in one file, written atomically.

The file holds tensors and plain Python values only and is read with
``torch.load(weights_only=True)``: loading a checkpoint never executes code. A SHA-256 of the
file is kept beside it; a checkpoint whose digest does not match is refused, never used.

``resume`` (top-level key): ``auto`` continues from this run directory's checkpoint if there is
one (so a requeued or re-launched job picks up where it stopped), ``true`` requires one,
``false`` starts afresh, and a path continues from another run directory's checkpoint (copied
here first). A config that differs from the checkpoint's in anything but the run-management
keys is refused with the differences listed.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from clrun.config import ConfigError
from clrun.io import flatten, write_atomic

FILE = "checkpoint/state.pt"
# Keys that may differ between a run and its resumption.
RUN_MANAGEMENT_KEYS = (
    "resume",
    "threads",
    "deterministic",
    "data_dir",
    "checkpoint",
    "logger",
    "plots",
)
# Keys under which a state holds random-generator states: ``load`` leaves them on the CPU, the
# only device a ``torch.Generator.set_state`` or ``torch.set_rng_state`` takes them from.
RNG_KEYS = ("generator", "rng", "gen_state")


class CheckpointError(RuntimeError):
    pass


def save(run_dir: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = Path(run_dir) / FILE
    write_atomic(path, data)
    write_atomic(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest() + "\n")


def rng_state(gen: torch.Generator, device: torch.device) -> dict:
    """The random states a resumed run needs: torch's CPU generator (model init, dropout on the
    CPU), the minibatch-order generator ``gen`` and, on a GPU, the device's (dropout there)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "data": gen.get_state(), "cuda": cuda}


def restore_rng(rng: dict, gen: torch.Generator, device: torch.device) -> None:
    """Undo :func:`rng_state`."""
    torch.set_rng_state(rng["torch"])
    gen.set_state(rng["data"])
    if rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def load(run_dir: Path, device: torch.device) -> dict | None:
    """The saved state, or None if the run has no checkpoint yet. Its tensors are on ``device``,
    except the random-generator states under :data:`RNG_KEYS`, which stay on the CPU."""
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
    return to_device(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), device)


def to_device(state, device: torch.device, rng: bool = False):
    """``state`` (nested dicts, lists and tuples of tensors) with its tensors moved to ``device``,
    but those under a key of :data:`RNG_KEYS`."""
    if isinstance(state, torch.Tensor):
        return state if rng else state.to(device)
    if isinstance(state, dict):
        return {k: to_device(v, device, rng or k in RNG_KEYS) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_device(v, device, rng) for v in state)
    return state


def load_for_resume(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict | None:
    """The checkpoint to resume from according to ``cfg.resume``, checked against ``cfg``."""
    resume = cfg.get("resume", "auto")
    if resume is False:
        return None
    if resume not in (True, "auto"):
        source = Path(str(resume)) / FILE
        if not source.exists():
            raise ConfigError(f"resume={resume!r}: no checkpoint at {source}")
        if source.resolve() != (Path(run_dir) / FILE).resolve():
            (Path(run_dir) / FILE).parent.mkdir(parents=True, exist_ok=True)
            for f in (source, source.with_suffix(".sha256")):
                shutil.copy2(f, Path(run_dir) / "checkpoint" / f.name)
    saved = load(run_dir, device)
    if saved is None and resume is True:
        raise ConfigError(f"resume=true but {Path(run_dir) / FILE} does not exist")
    if saved is not None:
        check_same_config(saved["config"], cfg)
    return saved


def check_same_config(saved: dict, cfg: DictConfig) -> None:
    flat_saved, flat_now = flatten(saved), flatten(OmegaConf.to_container(cfg, resolve=True))
    diff = [
        f"{k}: checkpoint {flat_saved.get(k)!r}, now {flat_now.get(k)!r}"
        for k in sorted(set(flat_saved) | set(flat_now))
        if flat_saved.get(k) != flat_now.get(k) and k.split(".")[0] not in RUN_MANAGEMENT_KEYS
    ]
    if diff:
        raise ConfigError(
            "cannot resume: the config differs from the checkpoint's in "
            + "; ".join(diff)
            + " (use resume=false to start afresh)"
        )
