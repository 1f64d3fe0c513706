"""Graceful stops: SIGTERM (SLURM preemption, ``kill``), SIGINT (Ctrl-C) and SIGUSR2 (the
signal submitit asks SLURM to send before a time limit or preemption).

On the first such signal the runner finishes the current training step, writes a checkpoint and
``summary.json`` with ``status: interrupted``, and then hands the signal to whoever handled it
before (submitit's handler requeues the job, which then resumes from the checkpoint); with no
such handler the run stops with :class:`RunInterrupted` and the CLI exits with status 3.
A second signal while stopping aborts at once. In a distributed run the processes agree, at
each step, whether any of them got a signal (:func:`clrun.distributed.agree_to_stop`): all stop
after the same step.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGUSR2", None)) if s)


class RunInterrupted(Exception):
    """The run stopped on a signal after saving a checkpoint."""


class StopSignal:
    """Turns termination signals into a flag the training loop checks after each step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.agreed: bool | None = None  # a distributed run's decision; None: this process's own
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # second signal: stop now
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def hand_over(self) -> None:
        """After the checkpoint, if a signal came: let the previous handler act (submitit
        requeues), else raise. Without a signal (or, distributed, without the agreement to stop
        that every process makes at the same point), nothing."""
        stopping = self.requested if self.agreed is None else self.agreed
        if not stopping:
            return
        previous = self.previous.get(self.signum)
        self.restore()
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.signum, None)
        raise RunInterrupted(f"stopped by signal {signal.Signals(self.signum).name}")
