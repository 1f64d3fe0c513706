"""clrun from Python (a notebook, a script): compose a config as the ``clrun`` command does, run
it, and load a finished run with its trained model.

    cfg = clrun.compose(["strategy=replay", "buffer.max_size=500"])   # as `clrun ...` composes
    summary = clrun.run(cfg, run_dir="outputs/replay")                 # summary.json's content
    loaded = clrun.load_run("outputs/replay")    # config, summary, matrices, model(x, t)

:func:`compose` keeps a small ``hydra`` node in the config it returns (Hydra's own
``hydra.runtime.choices`` and ``hydra.overrides.task``) so that :func:`run` can record the
chosen options and the overrides in ``summary.json`` and ``.hydra/`` exactly as a CLI run does;
the runner never sees that node. A key changed on the returned config after composing is used,
and is in ``.hydra/config.yaml``, but not in ``overrides.yaml``.

``clrun.run`` is both this module's :func:`run` and the module ``clrun/run.py`` (the loop): Python
binds a submodule to its package's attribute of the same name when it is imported (by
``from clrun.run import train`` anywhere), which would replace a function there. So the module
itself is callable (:class:`CallableModule`): ``clrun.run(cfg)`` and ``from clrun import run;
run(cfg)`` call :func:`run` whatever was imported before, and ``clrun.run.train`` and every
``from clrun.run import ...`` keep working.

Nothing here imports torch or Hydra at import time: ``import clrun`` stays quick.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clrun.errors import ConfigError, OutputError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from omegaconf import DictConfig

    from clrun.benchmarks import Benchmark
    from clrun.components import Components

log = logging.getLogger("clrun")


def compose(overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> DictConfig:
    """The config ``clrun <overrides>`` (with ``--config-dir config_dir``) would run, validated:
    a bad value, an unknown key or an unknown option raises the one-line
    :class:`~clrun.errors.ConfigError` the command prints. Callable any number of times, inside a
    notebook or another Hydra app (Hydra's global state is restored afterwards)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict

    from clrun import cli
    from clrun.config import validate

    overrides = [overrides] if isinstance(overrides, str) else [str(o) for o in overrides]
    search, argv = [], list(overrides)
    if config_dir is not None:
        folder = Path(config_dir).expanduser().resolve()
        if not folder.is_dir():
            raise ConfigError(f"config_dir={str(config_dir)!r}: no such folder")
        search = [f"hydra.searchpath=[file://{folder}]"]  # what --config-dir adds
        argv += ["--config-dir", str(folder)]
    try:
        with initialize_config_dir(str(cli.config_dir()), version_base="1.3"):
            cfg = hydra_compose("config", [*overrides, *search], return_hydra_config=True)
    except HydraException as e:
        # the CLI's message for an unknown key names the keys that exist; else Hydra's own
        message = cli._check_override_keys(argv) or " ".join(str(e).split())
        raise ConfigError(message) from None
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in cli.GROUPS}
    meta: dict[str, Any] = {
        "runtime": {"choices": choices},
        # as Hydra splits them: hydra.* and hydra/... overrides are not the job's
        "overrides": {"task": [o for o in overrides if not o.lstrip("+~").startswith("hydra")]},
    }
    if any(o.startswith("hydra.run.dir=") for o in overrides):
        meta["run"] = {"dir": str(cfg.hydra.run.dir)}  # resolved now: ${now:...} once
    with open_dict(cfg):
        cfg.hydra = OmegaConf.create(meta)
    validate(cfg)
    return cfg


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Run the experiment ``cfg`` (from :func:`compose`) into ``run_dir`` and return its
    summary (``summary.json``). ``run_dir=None``: a fresh ``outputs/<date>/<time>`` below the
    working directory (or the ``hydra.run.dir=`` given to compose). Like the CLI, it writes
    ``.hydra/config.yaml``, ``.hydra/overrides.yaml`` and ``run.log`` into the run directory,
    continues an interrupted run found there (``resume=auto``) and leaves a completed one as
    it is. Raises :class:`~clrun.errors.ConfigError` for a bad config, before writing anything."""
    from omegaconf import OmegaConf, open_dict

    from clrun import cli
    from clrun.config import validate
    from clrun.io import write_atomic
    from clrun.outcome import Outcome
    from clrun.run import run as run_experiment

    choices = {g: OmegaConf.select(cfg, f"hydra.runtime.choices.{g}") for g in cli.GROUPS}
    overrides = list(OmegaConf.select(cfg, "hydra.overrides.task", default=None) or [])
    given_dir = OmegaConf.select(cfg, "hydra.run.dir", default=None)
    job = copy.deepcopy(cfg)
    with open_dict(job):
        job.pop("hydra", None)
    validate(job)
    run_dir = _make_run_dir(run_dir if run_dir is not None else given_dir)
    if Outcome.completed(run_dir) is None or job.get("resume", "auto") is False:
        # a completed run keeps its record: the runner checks the config and returns its summary
        write_atomic(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(job))
        write_atomic(run_dir / ".hydra" / "overrides.yaml", OmegaConf.to_yaml(overrides))
    with _log_to(run_dir / "run.log"):
        return run_experiment(job, run_dir, {**choices, "overrides": overrides})


class CallableModule(types.ModuleType):
    """The type of the module ``clrun.run``: calling it calls :func:`clrun.api.run`."""

    def __call__(self, cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
        return run(cfg, run_dir)


@dataclass
class LoadedRun:
    """A finished (or stopped) run, loaded by :func:`load_run`.

    ``model`` is in eval mode on ``device`` and takes prepared inputs:
    ``model(benchmark.prepare(exp.x, exp.e), exp.t)`` gives logits over every class.
    ``experience``: the experience the model was trained through (row ``experience`` of
    ``acc_matrix``). ``components``: the strategy's components as the final checkpoint left them
    (None for a model kept by ``checkpoint.keep=every_experience``)."""

    run_dir: Path
    config: DictConfig
    summary: dict
    acc_matrix: np.ndarray
    val_acc_matrix: np.ndarray | None
    task_acc_matrix: np.ndarray | None
    model: torch.nn.Module
    experience: int | None
    device: torch.device
    components: Components | None = None
    buffer: Any = None
    _benchmark: Benchmark | None = field(default=None, repr=False)

    def benchmark(self) -> Benchmark:
        """The run's benchmark, built from its config (the data is loaded on first call)."""
        if self._benchmark is None:
            import torch

            from clrun.config import build

            with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
                self._benchmark = build(self.config.benchmark, "benchmark").to(self.device)
            if self.model is not None:  # a pre-trained backbone's input size and normalisation
                self._benchmark.fit_input(getattr(self.model, "input_spec", None))
        return self._benchmark

    def evaluate(self, batch_size: int | None = None) -> list[float]:
        """Accuracy on every test experience, computed as the run did: row ``experience`` of
        the accuracy matrix (``metrics.jsonl``'s exact values). With the final checkpoint, a
        strategy's ``predict`` (iCaRL's nearest-mean classifier) scores as in the run; a model
        kept by ``checkpoint.keep=every_experience`` is scored by its own logits."""
        from clrun.components import Components, RunState
        from clrun.run import evaluate

        cfg = self.config
        state = RunState(
            self.model,
            self.benchmark(),
            self.device,
            batch_size=cfg.strategy.batch_size,
            precision=cfg.get("precision", "fp32"),
            channels_last=bool(cfg.get("channels_last")),
            buffer=self.buffer,
        )
        size = batch_size or cfg.strategy.eval_batch_size
        return [r["acc"] for r in evaluate(state, self.components or Components({}), size)]


def load_run(
    run_dir: str | Path, experience: int | None = None, device: str | None = None
) -> LoadedRun:
    """Load a run directory: its config, summary, accuracy matrices and the model rebuilt with
    its grown heads from the final checkpoint, or from the model kept after ``experience``
    (``checkpoint.keep=every_experience``). ``device``: where the model goes (default: the
    run's ``device`` setting where available, else the CPU). Files are read with
    ``weights_only=True``: loading never executes code."""
    import torch
    from omegaconf import OmegaConf

    from clrun import checkpoint
    from clrun.components import Components
    from clrun.config import build, resolve_device

    run_dir = Path(run_dir)
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.exists():
        raise ConfigError(f"{run_dir} is not a clrun run directory: no .hydra/config.yaml in it")
    cfg = OmegaConf.load(config_file)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    acc, val, task = (_matrix(run_dir / f"{p}acc_matrix.csv") for p in ("", "val_", "task_"))
    device = torch.device(device) if device is not None else _run_device(cfg, resolve_device)
    cpu = torch.device("cpu")
    if experience is None:
        saved = checkpoint.load(run_dir, cpu)
        if saved is None:
            raise ConfigError(f"{run_dir} has no model to load: no {checkpoint.FILE}")
        finished = saved.get("position") is None  # else it stopped inside an experience
        trained = len(saved["recorder"]["rows"]) - 1 if finished else None
    else:
        path = checkpoint.model_file(run_dir, experience)
        if not path.exists():
            keep = OmegaConf.select(cfg, "checkpoint.keep", default="last")
            kept = sorted(
                int(f.stem.removeprefix("model_exp")) for f in path.parent.glob("model_exp*.pt")
            )
            if keep == "every_experience":
                why = f"it kept the models after experiences {kept}"
            else:
                why = (
                    f"checkpoint.keep={keep}: run with checkpoint.keep=every_experience to keep "
                    "one after each experience"
                )
            raise ConfigError(
                f"experience={experience}: {run_dir} has no model after experience "
                f"{experience} ({why})"
            )
        saved, trained = checkpoint.read(path, cpu), experience
    loaded = LoadedRun(run_dir, cfg, summary, acc, val, task, None, trained, device)
    shape = saved.get("model_shape")
    if shape is None:  # a checkpoint written before the shape was recorded: ask the data
        shape = checkpoint.model_shape(loaded.benchmark())
    shape = {"input_shape": tuple(shape["input_shape"]), "n_classes": shape["n_classes"]}
    with torch.random.fork_rng(devices=[]):  # initial weights, overwritten: the caller's RNG
        model = build(cfg.model, "model", **shape).to(device)  # stays as it was
    if cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(checkpoint.to_device(saved["model"], device))
    loaded.model = model.eval()
    if experience is None:  # the components as they predicted at the end (iCaRL's means, ...)
        loaded.buffer = build(cfg.buffer, "buffer", seed=cfg.seed) if cfg.get("buffer") else None
        parts = {
            name: build(node, f"strategy.components.{name}", buffer=loaded.buffer, seed=cfg.seed)
            for name, node in (cfg.strategy.get("components") or {}).items()
            if node is not None
        }
        loaded.components = Components(parts)
        loaded.components.load_state_dict(checkpoint.to_device(saved["components"], device))
        if loaded.buffer is not None and saved.get("buffer") is not None:
            loaded.buffer.load_state_dict(checkpoint.to_device(saved["buffer"], device))
    return loaded


def _matrix(path: Path) -> np.ndarray | None:
    """An ``*acc_matrix.csv`` (a header, then one row per trained-through experience)."""
    import numpy as np

    if not path.exists():
        return None
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


def _run_device(cfg: DictConfig, resolve_device) -> torch.device:
    import torch

    try:
        return resolve_device(cfg.get("device", "auto"))
    except ConfigError:  # a GPU run loaded on a machine without one
        return torch.device("cpu")


def _make_run_dir(run_dir: str | Path | None) -> Path:
    """``run_dir``, made if it is not there; None: a fresh ``outputs/<date>/<time>`` as the CLI
    names it, with ``-1``, ``-2``, ... when a run started in the same second (never another
    run's directory to continue). One line (:class:`OutputError`) if it cannot be made."""
    if run_dir is None:
        stamp = datetime.now()
        base = Path("outputs") / stamp.strftime("%Y-%m-%d") / stamp.strftime("%H-%M-%S")
        candidates = [base, *(base.with_name(f"{base.name}-{n}") for n in range(1, 1000))]
    else:
        candidates = [Path(run_dir)]
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=run_dir is not None)
            return candidate
        except FileExistsError:
            if run_dir is None:
                continue  # taken: the next name
            raise OutputError(f"cannot write the run directory {candidate}: it is a file") from None
        except OSError as e:  # the CLI's one line (exit 4) for the same failure
            raise OutputError(
                f"cannot write the run directory {candidate}: {e.strerror or e}; "
                "pass another run_dir"
            ) from e
    raise OutputError(f"no fresh run directory next to {base}: pass run_dir")


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    """For the duration of the run, as under the CLI: its log lines (and a failure's traceback)
    go to ``path``, and its progress lines to the console unless the caller set up logging
    (a root handler: theirs shows them). The caller's logging setup is restored afterwards."""
    root, level = logging.getLogger(), log.level
    file = logging.FileHandler(path)
    file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handlers = [file] if root.handlers else [file, logging.StreamHandler()]
    for h in handlers:
        root.addHandler(h)
    if not log.isEnabledFor(logging.INFO):
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.setLevel(level)
        for h in handlers:
            root.removeHandler(h)
            h.close()
