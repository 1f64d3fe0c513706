"""The failures clrun knows, and the exit status of the ``clrun`` command for each.

====  ==========================================================================================
exit  meaning
====  ==========================================================================================
0     the run completed (or its run directory already held a completed run: nothing to do)
1     an unexpected error (Python traceback), or a multirun in which some jobs did not complete
2     a configuration error: one ``clrun: error: ...`` line naming the key, the value and what
      is allowed
3     interrupted by a signal (SIGTERM, SIGINT, SIGUSR2) after saving a checkpoint: the same
      command continues the run
4     a known runtime failure: a dataset that cannot be obtained, a corrupted checkpoint, a
      diverging loss, a run directory that cannot be written. One ``clrun: error: ...`` line
      says what failed and what to do; the traceback goes to ``run.log`` and ``summary.json``
====  ==========================================================================================
"""

from __future__ import annotations

import logging

EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 3
EXIT_RUN_FAILURE = 4


class ConfigError(ValueError):
    """A user error in the configuration. The message names the key, the value and what is
    allowed; the CLI prints it without a traceback (exit 2)."""


class RunFailure(RuntimeError):
    """A known runtime failure (exit 4). ``str(e)`` may span lines (details for ``run.log``);
    :meth:`line` is what the console shows."""

    def line(self) -> str:
        return " ".join(str(self).split())


class TrainingDiverged(RunFailure, FloatingPointError):
    """The training loss became NaN or infinite."""


class OutputError(RunFailure):
    """A file of the run directory cannot be written (permissions, a full disk, a bad path)."""


def log_to_file_only(text: str) -> None:
    """Write ``text`` (a traceback) to the log files of the root logger (Hydra's ``run.log``),
    not to the console."""
    root = logging.getLogger()
    record = logging.LogRecord("clrun", logging.ERROR, __file__, 0, text, None, None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
