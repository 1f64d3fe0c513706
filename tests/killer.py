"""Test-only components: stop the process, or poison the loss, at a chosen step.

``KillAt`` reads ``CLRUN_TEST_KILL_AT=<step>:<SIGNAL>`` from the environment, so the killed run
and the runs compared with it have the same config (a resumed run must match it exactly);
``e<i>:<SIGNAL>`` stops it as experience i starts (for strategies that take no step)."""

import os
import signal

import torch


class KillAt:
    def after_step(self, state, batch, x, out):
        spec = os.environ.get("CLRUN_TEST_KILL_AT")
        if spec and not spec.startswith("e"):
            step, name = spec.split(":")
            if state.step == int(step):
                os.kill(os.getpid(), getattr(signal, name))

    def pre_update(self, state, exp):
        spec = os.environ.get("CLRUN_TEST_KILL_AT")
        if spec and spec.startswith("e"):
            experience, name = spec[1:].split(":")
            if exp.index == int(experience):
                os.kill(os.getpid(), getattr(signal, name))


class NaNAt:
    def __init__(self, step: int):
        self.step = step

    def penalty(self, state, batch, x, out):
        return torch.tensor(float("nan")) if state.step + 1 == self.step else None
