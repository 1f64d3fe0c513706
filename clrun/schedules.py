"""Learning-rate schedules over each experience's epochs (config group ``lr_schedule``; none by
default: the optimiser's ``lr`` throughout).

When an epoch of an experience starts (epoch 0, 1, ... counted from the experience's first step;
with ``strategy.iterations`` an epoch is one pass over the experience's data), the runner calls
``schedule.apply(optimizer, epoch)``, which sets every parameter group's learning rate to
``schedule.lr(initial_lr, epoch)`` (``initial_lr``: the group's rate as the optimiser was built,
kept in the group as PyTorch's schedulers keep it, so it is checkpointed with the optimiser).
A schedule therefore starts again with every experience, as GDumb's retraining from scratch and
iCaRL's per-task decay do. A schedule is stateless: resuming mid-experience sets the same rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from clrun.checks import Rule, int_at_least, number_above, number_at_least, require


def _number(name: str, v: object, rule: Rule) -> float:
    return float(require(f"lr_schedule.{name}", v, rule))


def _count(name: str, v: object, low: int) -> int:
    return require(f"lr_schedule.{name}", v, int_at_least(low))


class Schedule:
    def lr(self, base_lr: float, epoch: int) -> float:
        raise NotImplementedError

    def apply(self, optimizer: torch.optim.Optimizer, epoch: int) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr(group.setdefault("initial_lr", group["lr"]), epoch)


class CosineRestarts(Schedule):
    """SGDR (Loshchilov & Hutter, ICLR 2017), once an epoch: after ``warmup_epochs`` at
    ``warmup_factor`` × lr, cycles of ``first_cycle``, ``first_cycle`` · ``cycle_mult``, ...
    epochs, each annealing from lr towards ``min_lr`` by a half cosine (the rate at the start of
    epoch t of a cycle of T epochs: min_lr + (lr − min_lr)(1 + cos(πt/T))/2). GDumb's code:
    lr 0.05, min_lr 0.0005, first_cycle 1, cycle_mult 2, one warm-up epoch at 0.1 × lr
    (PyTorch's CosineAnnealingWarmRestarts stepped once an epoch after it)."""

    def __init__(
        self,
        min_lr: float = 0.0,
        first_cycle: int = 1,
        cycle_mult: int = 2,
        warmup_epochs: int = 0,
        warmup_factor: float = 0.1,
    ):
        self.min_lr = _number("min_lr", min_lr, number_at_least(0))
        self.first_cycle = _count("first_cycle", first_cycle, 1)
        self.cycle_mult = _count("cycle_mult", cycle_mult, 1)
        self.warmup_epochs = _count("warmup_epochs", warmup_epochs, 0)
        self.warmup_factor = _number("warmup_factor", warmup_factor, number_above(0))

    def lr(self, base_lr: float, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return base_lr * self.warmup_factor
        t, length = epoch - self.warmup_epochs, self.first_cycle
        while t >= length:
            t, length = t - length, length * self.cycle_mult
        return self.min_lr + (base_lr - self.min_lr) * (1 + math.cos(math.pi * t / length)) / 2


class StepDecay(Schedule):
    """The rate times ``gamma`` at each of the ``milestones`` (epochs, increasing): e.g. iCaRL's
    lr / 5 at epochs 49 and 63 of 70 (``milestones: [49, 63]``, ``gamma: 0.2``)."""

    def __init__(self, milestones: Sequence[int] = (), gamma: float = 0.1):
        self.milestones = [_count("milestones[]", m, 1) for m in milestones]
        increasing = Rule(lambda ms: ms == sorted(set(ms)), "increasing epochs")
        require("lr_schedule.milestones", list(milestones), increasing)
        self.gamma = _number("gamma", gamma, number_above(0))

    def lr(self, base_lr: float, epoch: int) -> float:
        return base_lr * self.gamma ** sum(epoch >= m for m in self.milestones)


class CodaCosine(Schedule):
    """The cosine of CODA-Prompt's code (``utils/schedulers.py`` ``CosineSchedule``), which
    InfLoRA's code keeps: the rate at the start of epoch e of an experience of K = ``epochs``
    epochs is lr · cos(99π e / (200 (K − 1))), from lr at the first epoch to lr · cos(0.495π)
    ≈ 0.016 lr at the last (epochs past K − 1 continue the cosine)."""

    def __init__(self, epochs: int = 20):
        self.epochs = _count("epochs", epochs, 1)

    def lr(self, base_lr: float, epoch: int) -> float:
        if self.epochs == 1:
            return base_lr
        return base_lr * math.cos(99 * math.pi * epoch / (200 * (self.epochs - 1)))
