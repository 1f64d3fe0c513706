"""The ``clrun`` command: Hydra composes the config, :func:`clrun.run.run` runs it.

The task function returns the summary field named by ``optimize`` (default: the validation final
average accuracy when ``benchmark.validation`` holds out a split, else the test one) so that Hydra
sweepers (Optuna) can optimise it; an Optuna search on a test-stream metric prints a warning. Exit statuses are those of :mod:`clrun.errors`: a config error (2) or a known
runtime failure (4: a dataset that cannot be obtained, a corrupted checkpoint, a diverging loss,
a run directory that cannot be written) prints one ``clrun: error: ...`` line, the traceback going
to ``run.log`` and ``summary.json``; an unexpected error keeps Hydra's traceback (1). The run
directory gets a ``summary.json`` saying ``failed`` and why, which records the job's command-line
overrides (``overrides``). A single run whose run directory already holds a completed run of the
same overrides is left untouched (exit 0) unless ``resume=false``.

In a multirun (``-m``, or a sweeper preset) every job runs whatever the others do:

- a job whose directory already holds a ``completed`` summary for the same overrides (ignoring
  the run-management keys ``resume``, ``threads``, ``data_dir``, ``checkpoint``, ...) is skipped,
  so re-running a sweep command into the same ``hydra.sweep.dir`` only runs what is missing or
  failed;
- a failing job is recorded (``summary.json``: ``failed``) and logged, and returns None, which
  the Optuna sweeper records as a failed trial (NaN would crash optuna 2.10's ``tell``); the
  sweep goes on. A job stopped by a signal (Ctrl-C, SIGTERM) stops the sweep with status 3;
  the same command continues it (``resume=auto`` picks up the stopped job's checkpoint);
- after the sweep, ``clrun`` writes the report of the sweep directory (``clrun-report``'s
  report.md, report.tex, runs.csv and plots; its path printed), then exits with status 1 and
  lists the runs of the sweep directory that did not complete, if any;
- under the joblib launcher with ``threads=null``, each job gets cores // n_jobs torch threads.
"""

from __future__ import annotations

import difflib
import gc
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from clrun.errors import (
    EXIT_CONFIG_ERROR,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILURE,
)

GROUPS = ("benchmark", "model", "strategy", "buffer", "optimizer")
# Hydra plugins the optional extras bring: (group, option prefix) → (plugin module, extra)
PLUGINS = {
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    ("hydra/launcher", "submitit"): ("hydra_plugins.hydra_submitit_launcher", "sweep"),
    ("hydra/launcher", "slurm"): ("hydra_plugins.hydra_submitit_launcher", "sweep"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    ("hparams_search", ""): ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
}

log = logging.getLogger("clrun")


def config_dir() -> Path:
    """The packaged configs (installed wheel) or the repository's top-level ``conf/``."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parent / "conf"


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    _freeze_startup_objects()
    from clrun.config import objective
    from clrun.errors import ConfigError, RunFailure
    from clrun.preemption import RunInterrupted
    from clrun.run import run

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    # The summary spreads these into its own fields: the chosen options and the overrides.
    choices = {**{g: hc.runtime.choices.get(g) for g in GROUPS}, "overrides": overrides}
    if hc.mode != RunMode.MULTIRUN:
        try:
            return run(cfg, run_dir, choices).get(objective(cfg))
        except ConfigError as e:
            _fail(str(e), EXIT_CONFIG_ERROR)
        except RunFailure as e:
            _fail(f"{e.line()} (details: {run_dir / 'run.log'})", EXIT_RUN_FAILURE)
        except RunInterrupted as e:
            print(f"clrun: {e}; checkpoint saved, continue with the same command", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    job = f"job #{hc.job.num} ({' '.join(overrides) or 'no overrides'})"
    done = _completed_summary(run_dir, overrides)
    if done is not None:
        log.info("%s: skipped, %s already holds a completed run of it", job, run_dir)
        return done.get(objective(cfg))
    _share_cores_between_jobs(cfg, hc)
    try:
        return run(cfg, run_dir, choices).get(objective(cfg))
    except RunInterrupted as e:  # Ctrl-C or SIGTERM: the whole sweep stops (SystemExit)
        print(
            f"clrun: {job} {e}; checkpoint saved. The same command continues the sweep: "
            "completed jobs are skipped, this one resumes",
            file=sys.stderr,
        )
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # noqa: BLE001 - one failing job must not stop the sweep
        text = e.line() if isinstance(e, RunFailure) else " ".join(str(e).split())
        log.error("%s failed: %s: %s", job, type(e).__name__, text)
        return None


def _fail(message: str, status: int) -> None:
    print(f"clrun: error: {message}", file=sys.stderr)
    sys.exit(status)


_frozen = False


def _freeze_startup_objects() -> None:
    """Move the objects alive now - Hydra, OmegaConf and the composed config, which live until
    the process ends - out of the garbage collector's sight (``gc.freeze``), once per process.
    Every full collection afterwards (several while torch is imported, one at exit) would
    otherwise scan them again: ~0.15 s per run. A plain script that imports torch has none of
    them to scan; this keeps clrun's start-up from making torch's slower."""
    global _frozen
    if not _frozen:
        gc.freeze()
        _frozen = True


def main() -> None:
    """Console entry point (``clrun`` and ``python -m clrun``). Under torchrun the processes
    join their group first and agree on rank 0's run directory (:mod:`clrun.distributed`)."""
    argv = sys.argv[1:]
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        from clrun import distributed

        sys.argv += distributed.command_line_overrides(argv)
    try:
        _main()
    except SystemExit as e:
        # Hydra exits with 1 after its own message when composition fails; if a missing plugin
        # or an unknown key was the cause, say what to do (composing again only then: ~0.1 s).
        message = (_missing_plugin(argv) or _check_override_keys(argv)) if e.code == 1 else None
        if message:
            _fail(message, EXIT_CONFIG_ERROR)
        raise
    finally:
        if "clrun.distributed" in sys.modules:  # a distributed run leaves its group
            sys.modules["clrun.distributed"].shutdown()


def _missing_plugin(argv: list[str]) -> str | None:
    """``hydra/launcher=joblib`` (and the like) without the extra that installs the plugin."""
    for arg in argv:
        group, _, option = arg.partition("=")
        for (g, prefix), (module, extra) in PLUGINS.items():
            if group == g and option.startswith(prefix) and not _importable(module):
                return (
                    f"{arg} needs a Hydra plugin that is not installed ({module}): "
                    f"pip install 'clrun[{extra}]' (from a checkout: pip install -e '.[{extra}]')"
                )
    return None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


class RunDirectoryCheck(Callback):
    """Hydra callback, before Hydra writes anything into the run directory: a single run whose
    directory already holds a completed run of the same overrides is left untouched (exit 0;
    ``resume=false`` runs it again), and a run or sweep directory that cannot be written is a
    one-line error (exit 4)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        run_dir = Path(config.hydra.run.dir)
        summary = _completed_summary(run_dir, list(config.hydra.overrides.task), quiet=True)
        if summary is not None and config.get("resume", "auto") is not False:
            acc = summary.get("final_avg_acc")
            print(
                f"clrun: {run_dir} already holds this completed run (final average accuracy "
                f"{acc:.4f}); nothing to do. resume=false runs it again in place.",
                file=sys.stderr,
            )
            sys.exit(0)
        _check_writable(run_dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")
        _warn_test_set_tuning(config)


def _warn_test_set_tuning(config: DictConfig) -> None:
    """An Optuna search that optimises a test-stream metric tunes on the test set: say so."""
    sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
    if "optuna" not in sweeper.lower():
        return
    from clrun.config import objective
    from clrun.errors import ConfigError

    try:
        name = objective(config)
    except ConfigError as e:
        _fail(str(e), EXIT_CONFIG_ERROR)
    if not name.startswith("val_"):
        print(
            f"clrun: warning: this Optuna search maximises optimize={name}, a test-stream metric: "
            "the chosen hyperparameters are tuned on the test set. Set benchmark.validation "
            "(e.g. 0.1) to tune on a held-out validation split instead.",
            file=sys.stderr,
        )


def _check_writable(folder: Path, key: str) -> None:
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        _fail(
            f"cannot write the run directory {folder}: {e.strerror or e}; "
            f"choose another with {key}=PATH",
            EXIT_RUN_FAILURE,
        )


class SweepOutcome(Callback):
    """Hydra callback: after all jobs of a multirun ran, exit with status 1 (listing them) if
    a run of the sweep directory did not complete."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from clrun.report import find_runs

        sweep_dir = Path(config.hydra.sweep.dir)
        runs = find_runs([sweep_dir]) if sweep_dir.is_dir() else []
        bad = [r for r in runs if r.status != "completed"]
        if bad:
            print(
                f"clrun: {len(bad)} of {len(runs)} runs in {sweep_dir} did not complete:",
                file=sys.stderr,
            )
            for r in bad:
                print(f"  {r.dir}: {r.status}{': ' + r.error if r.error else ''}", file=sys.stderr)
            sys.exit(EXIT_FAILED)


class SweepReport(Callback):
    """Hydra callback: after all jobs of a multirun ran, write ``clrun-report``'s files for the
    sweep directory (report.md, report.tex, runs.csv, plots) and print the path of report.md.
    Registered after ``sweep_outcome`` in conf/config.yaml because Hydra calls the
    ``on_multirun_end`` callbacks in reverse order: the report is written before
    :class:`SweepOutcome` exits 1 for runs that failed. A report that cannot be made is one
    warning line, never a failed sweep (:func:`clrun.report.sweep_report`)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from clrun.report import sweep_report

        sweep_report(Path(config.hydra.sweep.dir))


def _job_key(overrides: list[str]) -> list[str]:
    """What identifies a job: its overrides, less those that do not change its results."""
    from clrun.io import RUN_MANAGEMENT_KEYS, top_key

    return sorted(o for o in overrides if top_key(o) not in RUN_MANAGEMENT_KEYS)


def _completed_summary(run_dir: Path, overrides: list[str], quiet: bool = False) -> dict | None:
    """The summary in ``run_dir`` if it records a completed run of the same overrides. Hydra has
    already rewritten ``.hydra/overrides.yaml`` for this job, so the summary's copy is compared."""
    from clrun.report import read_summary

    summary = read_summary(run_dir)
    if not summary or summary.get("status") != "completed" or "overrides" not in summary:
        return None
    if (summary.get("unlearning") or {}).get("reference") == "pending":
        return None  # its comparison with the unlearning reference run is still to make
    if _job_key(summary["overrides"]) == _job_key(overrides):
        return summary
    if not quiet:
        log.warning(
            "%s holds a run of other overrides: %s", run_dir, " ".join(summary["overrides"])
        )
    return None


def _share_cores_between_jobs(cfg: DictConfig, hc) -> None:
    """The joblib launcher runs n_jobs jobs at once on this machine: with ``threads=null`` give
    each job cores // n_jobs torch threads, so that the jobs do not oversubscribe the cores."""
    target = str(OmegaConf.select(hc, "launcher._target_", default=""))
    if cfg.get("threads") is not None or not target.endswith("JoblibLauncher"):
        return
    from joblib import cpu_count

    cores, n_jobs = cpu_count(), hc.launcher.get("n_jobs") or 1
    if n_jobs < 0:  # joblib's convention: -1 = all cores, -2 = all but one, ...
        n_jobs = max(1, cores + 1 + n_jobs)
    cfg.threads = max(1, cores // n_jobs)
    log.info("joblib launcher, %d jobs on %d cores: threads=%d", n_jobs, cores, cfg.threads)


def _check_override_keys(argv: list[str]) -> str | None:
    """Hydra rejects an override of a key that does not exist, but without saying which keys
    do. Compose once (sweeps at their first value) and, if a key is unknown, name the keys that
    exist at that level and the closest match. Anything else is left to Hydra's own messages."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        args = get_args_parser().parse_args(argv)
        if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
            return None
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except (SystemExit, Exception):  # let Hydra report malformed command lines itself
        return None
    probe, keys = [], []
    for o in overrides:
        if o.key_or_group.startswith("hydra") or o.is_interval_sweep():
            continue  # interval() (Optuna) has no first value: left to the sweeper
        value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else None
        probe.append(
            f"{o.input_line.split('=', 1)[0]}={value}" if value is not None else o.input_line
        )
        if "." in o.key_or_group and o.type.name == "CHANGE":
            keys.append((o.key_or_group, o.input_line.split("=", 1)[1]))
    if not keys:
        return None
    if args.config_dir:
        probe.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    name = args.config_name or "config"
    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            try:
                compose(name, overrides=probe)
                return None
            except HydraException:
                bare = [p for p in probe if "." not in p.split("=", 1)[0] or p.startswith("hydra.")]
                cfg = compose(name, overrides=bare)
    except Exception:  # noqa: BLE001 - a problem Hydra will report in its own words
        return None
    for key, value in keys:
        if OmegaConf.select(cfg, key, default="\0missing") != "\0missing":
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig):
            return f"{key}={value}: '{parent_key}' has no keys (it is {parent!r})"
        allowed = sorted(str(k) for k in parent)
        close = difflib.get_close_matches(leaf, allowed, n=1)
        hint = f" Did you mean {parent_key}.{close[0]}?" if close else ""
        return (
            f"{key}={value}: unknown key '{leaf}' in {parent_key}; "
            f"allowed: {', '.join(allowed)}.{hint} (To add a new key use +{key}=...)"
        )
    return None
