"""Checkpoints: the whole resumable state of a run in one file, written atomically.

The file holds tensors and plain Python values only and is read with
``torch.load(weights_only=True)``: loading a checkpoint never executes code. A SHA-256 of the
file is kept beside it; a checkpoint whose digest does not match is refused, never used.

``resume`` (top-level key): ``auto`` continues from this run directory's checkpoint if there is
one (so a requeued or re-launched job picks up where it stopped), ``true`` requires one,
``false`` starts afresh, and a path continues from another run directory's checkpoint (copied
here first). A config that differs from the checkpoint's in anything but the run-management
keys is refused with the differences listed.

``checkpoint.keep``: ``last`` keeps only that resumable state; ``every_experience`` also keeps
the model after each experience i (``checkpoint/model_exp{i}.pt``: its weights and the shape to
rebuild it, no optimiser), for analysis with ``clrun.load_run(run_dir, experience=i)``. Neither
changes what a resumed run does.
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from clrun import distributed
from clrun.errors import ConfigError, RunFailure
from clrun.io import RUN_MANAGEMENT_KEYS, flatten, write_atomic

FILE = "checkpoint/state.pt"
KEEP = ("last", "every_experience")  # checkpoint.keep
# Keys under which a state holds random-generator states: ``load`` leaves them on the CPU, the
# only device a ``torch.Generator.set_state`` or ``torch.set_rng_state`` takes them from.
RNG_KEYS = ("generator", "rng", "gen_state")


class CheckpointError(RunFailure):
    """A checkpoint that does not match its checksum (exit 4)."""


def capture(
    cfg: DictConfig,
    state,
    components,
    recorder,
    gen: torch.Generator,
    work,
    next_experience: int,
    position: dict | None = None,
) -> dict:
    """The whole resumable state of a run: where it is (the next experience to train, and
    ``position`` inside the current one), the model, optimiser, components, buffer, recorder,
    random generators, benchmark state and the work so far."""
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "next_experience": next_experience,
        "position": position,
        "step": state.step,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "components": components.state_dict(),
        "buffer": state.buffer.state_dict() if state.buffer is not None else None,
        "recorder": recorder.state_dict(),
        "rng": rng_state(gen, state.device),
        "benchmark": state.benchmark.state_dict(),
        "work": vars(work),
        "model_shape": model_shape(state.benchmark),
        "world_size": distributed.world_size(),  # another one may resume it (a warning)
    }


def model_shape(benchmark) -> dict:
    """What the model is built from besides its config: load_run rebuilds it without the data."""
    return {"input_shape": list(benchmark.input_shape), "n_classes": benchmark.n_classes}


def model_file(run_dir: Path, experience: int) -> Path:
    """Where ``checkpoint.keep=every_experience`` keeps the model after ``experience``."""
    return Path(run_dir) / "checkpoint" / f"model_exp{experience}.pt"


def keep_model(cfg: DictConfig, run_dir: Path, experience: int, state) -> None:
    """With ``checkpoint.keep=every_experience``, keep the model that scored row ``experience``
    of the accuracy matrix. A resumed run that trains the experience again writes the same."""
    if OmegaConf.select(cfg, "checkpoint.keep", default="last") != "every_experience":
        return
    kept = {"model": state.model.state_dict(), "model_shape": model_shape(state.benchmark)}
    _write(model_file(run_dir, experience), kept)


def restore(
    saved: dict, state, components, recorder, gen: torch.Generator, work, make_optimizer
) -> tuple[int, dict | None]:
    """Undo :func:`capture` into the freshly built objects of a run; returns the experience to
    continue with and the position inside it (None: its start). Every process of a distributed
    run loads the same checkpoint."""
    distributed.check_resume(saved)
    state.model.load_state_dict(saved["model"])
    state.optimizer = make_optimizer(state.model.parameters())
    state.optimizer.load_state_dict(saved["optimizer"])
    components.load_state_dict(saved["components"])
    if state.buffer is not None:
        state.buffer.load_state_dict(saved["buffer"])
    recorder.load_state_dict(saved["recorder"])
    restore_rng(saved["rng"], gen, state.device)
    state.benchmark.load_state_dict(saved["benchmark"])
    vars(work).update(saved["work"])
    state.step = saved["step"]
    return saved["next_experience"], saved["position"]


def save(run_dir: Path, state: dict) -> None:
    _write(Path(run_dir) / FILE, state)


def _write(path: Path, state: dict) -> None:
    """``state`` to ``path`` atomically, with its SHA-256 beside it (``<name>.sha256``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
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
    return read(path, device) if path.exists() else None


def read(path: Path, device: torch.device) -> dict:
    """A file written by :func:`save` or :func:`keep_model`, checked against its SHA-256."""
    data = path.read_bytes()
    digest_file = path.with_suffix(".sha256")
    expected = digest_file.read_text().strip() if digest_file.exists() else None
    if expected != hashlib.sha256(data).hexdigest():
        raise CheckpointError(
            f"{path} does not match its checksum {digest_file.name}: the checkpoint is corrupted. "
            "Delete the checkpoint folder to start the run afresh."
        )
    return to_device(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), device)


def saved_config(run_dir: Path) -> dict:
    """The config of the run whose checkpoint is in ``run_dir`` ({} if it has none)."""
    saved = load(run_dir, torch.device("cpu"))
    return saved["config"] if saved is not None else {}


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
        same = source.resolve() == (Path(run_dir) / FILE).resolve()
        if not same and distributed.rank() == 0:  # in a group, rank 0 copies, the others wait
            (Path(run_dir) / FILE).parent.mkdir(parents=True, exist_ok=True)
            for f in (source, source.with_suffix(".sha256")):
                shutil.copy2(f, Path(run_dir) / "checkpoint" / f.name)
        distributed.barrier()
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
