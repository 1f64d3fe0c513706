"""How a run ends, in one place: ``summary.json`` for a completed, failed or interrupted run, the
closing lines on the console, and the run-level checks that a key the user set takes effect.

``summary.json`` says ``status``: ``running`` (not finished yet, or killed without a chance to
write), ``completed``, ``failed`` (with ``error`` and, but for config errors, ``traceback``) or
``interrupted`` (a signal; the checkpoint continues it). A failed or interrupted run keeps the
metrics of the experiences it finished.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig

from clrun.errors import ConfigError, OutputError, log_to_file_only
from clrun.io import top_key, write_json
from clrun.loggers import NoLogger
from clrun.metrics import Recorder, run_summary
from clrun.preemption import RunInterrupted

log = logging.getLogger("clrun")
SUMMARY = "summary.json"
# strategy keys that size a memory a strategy keeps itself, instead of the run's buffer
OWN_MEMORY_KEYS = ("memory_size", "patterns_per_experience")


class Outcome:
    """The summary of one run while it runs: ``with Outcome(...) as outcome:`` around the run
    writes ``summary.json`` if the run fails or is interrupted, then lets the exception go on.
    The runner hands it the objects it builds (``recorder``, ``stop``, ``logger``)."""

    def __init__(self, run_dir: Path, choices: dict | None, seed: int | None):
        self.run_dir, self.t0 = Path(run_dir), time.perf_counter()
        self.summary: dict = {"status": "running", **(choices or {}), "seed": seed}
        self.overrides: list[str] = list((choices or {}).get("overrides") or [])
        self.recorder: Recorder | None = None
        self.stop = None  # the run's StopSignal, restored on the way out
        self.logger = NoLogger()

    def __enter__(self) -> Outcome:
        return self

    def __exit__(self, kind, e, tb) -> bool:
        if self.stop is not None:
            self.stop.restore()
        if e is None:
            return False
        stopped = isinstance(e, RunInterrupted | KeyboardInterrupt)
        self.summary.update(status="interrupted" if stopped else "failed")
        self.summary["error"] = f"{type(e).__name__}: {e}"
        if not isinstance(e, ConfigError) and not stopped:
            self.summary["traceback"] = "".join(traceback.format_exception(e))
            log_to_file_only(self.summary["traceback"])
        if self.recorder is not None and self.recorder.rows:
            self.summary.update(run_summary(self.recorder))
        with contextlib.suppress(OutputError):  # if the run directory is what failed, it says so
            write_json(self.run_dir / SUMMARY, self.summary)
        self.logger.close(self.summary)
        return False

    def complete(self, device, extra: dict) -> dict:
        """The summary of a completed run (metrics, costs, ``extra``), written to disk."""
        self.summary.update(status="completed", **run_summary(self.recorder, device), **extra)
        write_json(self.run_dir / SUMMARY, self.summary)
        return self.summary

    def buffer_unused(self, cfg: DictConfig) -> None:
        """No component uses the run's buffer: the summary says ``buffer: null``, and a buffer
        override on the command line is an error where the strategy keeps its own memory (name
        the key that sizes it) and a warning where it keeps none (a sweep over strategies may
        set the buffer for those that use it)."""
        self.summary["buffer"] = None
        ignored = [o for o in self.overrides if top_key(o) == "buffer"]
        if not ignored:
            return
        strategy = self.summary.get("strategy") or "this strategy"
        own = [k for k in OWN_MEMORY_KEYS if k in (cfg.strategy or {})]
        if own:
            raise ConfigError(
                f"{ignored[0]}: strategy={strategy} keeps its own memory and uses no buffer; "
                f"set strategy.{own[0]} instead (now {cfg.strategy[own[0]]})"
            )
        log.warning("%s has no effect: strategy=%s uses no buffer", " ".join(ignored), strategy)
        self.summary["ignored_overrides"] = ignored

    @staticmethod
    def completed(run_dir: Path) -> dict | None:
        """The summary of the completed run in ``run_dir``, or None (no run, not completed, or
        a comparison with its unlearning reference still to make)."""
        try:
            summary = json.loads((Path(run_dir) / SUMMARY).read_text())
        except (OSError, ValueError):
            return None
        if summary.get("status") != "completed":
            return None
        if (summary.get("unlearning") or {}).get("reference") == "pending":
            return None
        return summary


def run_title(summary: dict) -> str:
    """The title of a run's plots: strategy, benchmark, model and seed."""
    return (
        f"{summary.get('strategy')} on {summary.get('benchmark')} ({summary.get('model')}), "
        f"seed {summary.get('seed')}"
    )


def closing_lines(summary: dict, run_dir: Path) -> str:
    """The few lines a run ends with on the console."""

    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"{summary.get('status')}: {summary.get('experiences_done')} experiences in "
        f"{summary.get('wall_time_s', 0):.1f} s",
        f"  final average accuracy  {fmt(summary.get('final_avg_acc'))}",
    ]
    for key, name in (("task_final_avg_acc", "  task-IL"), ("val_final_avg_acc", "  validation")):
        if summary.get(key) is not None:
            lines.append(f"{name:<26}{fmt(summary[key])}")
    lines += [
        f"  forgetting              {fmt(summary.get('forgetting'))}",
        f"  run directory           {Path(run_dir).resolve()}",
    ]
    return "\n".join(lines)
