"""Test-only components: stop the process, or poison the loss, at a chosen step.

``KillAt`` reads ``CLRUN_TEST_KILL_AT=<step>:<SIGNAL>`` from the environment, so the killed run
and the runs compared with it have the same config (a resumed run must match it exactly)."""

import os
import signal

import torch


class KillAt:
    def after_step(self, state, batch, x, out):
        spec = os.environ.get("CLRUN_TEST_KILL_AT")
        if spec:
            step, name = spec.split(":")
            if state.step == int(step):
                os.kill(os.getpid(), getattr(signal, name))


class NaNAt:
    def __init__(self, step: int):
        self.step = step

    def penalty(self, state, batch, x, out):
        return torch.tensor(float("nan")) if state.step + 1 == self.step else None
