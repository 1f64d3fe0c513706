"""PackNet (Mallya & Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative
Pruning", CVPR 2018): train a task on the free weights, prune a fraction of them by magnitude
(per layer), retrain the kept ones, freeze them; at evaluation task t uses only the weights of
tasks ≤ t.

Which weights: every ``nn.Linear`` / ``nn.Conv2d`` weight of ``model.backbone`` (the official
``src/prune.py`` prunes the conv and linear layers of ``model.shared``; the task's own head is
its classifier). ``owner`` per weight: 0 free (or pruned), k + 1 kept by the k-th task trained.

Hooks:

- ``train_data`` (every experience, and again on a resumed run): refuses anything but the task
  scenario with a multi-head model (one line); freezes the heads of earlier tasks and, after the
  first task, the biases and batch-norm layers (no gradients; batch norm in eval mode): the
  official code trains neither (``--train_biases`` / ``--train_bn`` off, ``model.train_nobn()``),
  so they stay as the first network left them; here that network is the first task's. Takes a
  snapshot of the weights earlier tasks own.
- ``pre_update``: the free weights become the new task's (official ``make_finetuning_mask``).
- ``after_backward``: zero gradient for every weight the current task does not own
  (``make_grads_zero``; after pruning that includes the pruned ones).
- ``after_step``: pruned weights back to 0 (``make_pruned_zero``) and weights of earlier tasks
  back to their snapshot (bit-identical under any optimiser: momentum or Adam would move them
  with a zero gradient). At step P = total − round(total · ``retrain_share``) of the experience:
  prune — in every layer, the ``prune_fraction`` of the current task's weights with the smallest
  magnitude (official ``pruning_mask``: the k-th smallest |w| by ``kthvalue``, k =
  round(fraction · n), and every weight with |w| ≤ it) are released and zeroed — and the
  learning rate is multiplied by ``retrain_lr_scale`` for the retraining steps that follow.
- ``post_update``: the learning rate back to its value before the retraining.
- ``predict`` (evaluation): logits with the weights of tasks ≤ the sample's task only
  (``apply_mask``), the rest zero.

Retraining runs through the runner's loop, not in an optimiser of our own inside
``post_update``: the loop's steps, data order, checkpoints and resume then cover it (a run
killed while retraining resumes there), and components never run a training loop. The
official code trains 20 epochs, prunes, and retrains 10 epochs at a 10× lower learning rate
with a fresh SGD (``src/scripts/run_sequence.sh``: ``--finetune_epochs 20 --lr 1e-3`` then
``--post_prune_epochs 10 --lr 1e-4``): ``epochs: 30``, ``retrain_share: 1/3``,
``retrain_lr_scale: 0.1`` here; the optimiser's state carries over into retraining.
State: the owners, the task order, the step inside the experience, whether it was pruned, and
the learning rates to restore.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call

from clrun.benchmarks import Experience
from clrun.checks import Rule, is_number, number_above, require
from clrun.components import RunState
from clrun.errors import ConfigError
from clrun.strategies.utils import freeze_other_heads, require_task_il

__all__ = ["PackNet"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


class PackNet:
    """Iterative pruning, retraining and freezing of per-task weight masks."""

    def __init__(
        self,
        prune_fraction: float = 0.75,
        retrain_share: float = 1 / 3,
        retrain_lr_scale: float = 0.1,
        epochs: int = 1,
        iterations: int | None = None,
    ):
        open01 = Rule(lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)")
        share = Rule(lambda v: is_number(v) and 0 <= v < 1, "a number in [0, 1)")
        self.prune_fraction = float(require("strategy.prune_fraction", prune_fraction, open01))
        self.retrain_share = float(require("strategy.retrain_share", retrain_share, share))
        self.retrain_lr_scale = float(
            require("strategy.retrain_lr_scale", retrain_lr_scale, number_above(0))
        )
        self.epochs, self.iterations = int(epochs), iterations
        self.owner: dict[str, Tensor] = {}  # weight name → 0 free, k + 1 kept by task k
        self.tasks: list[int] = []  # task labels in the order they were trained
        self.step = 0  # optimiser steps taken in the current experience
        self.total = 0  # steps of the current experience
        self.pruned = False
        self.lrs: list[float] = []  # the optimiser's rates before retraining
        self._frozen: dict[str, Tensor] = {}  # snapshot of weights earlier tasks own
        self._hooked: set[int] = set()

    # ------------------------------------------------------------------ hooks

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        require_task_il(state, "packnet")
        model = state.model
        freeze_other_heads(model, exp.classes_by_task)
        if self.tasks and set(exp.classes_by_task) != {self.tasks[0]}:  # after the first task
            for m in model.backbone.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                    m.bias.requires_grad_(False)
                if isinstance(m, _BN):
                    m.requires_grad_(False)
                    if id(m) not in self._hooked:  # the runner sets train mode: undo per forward
                        m.register_forward_pre_hook(_eval_mode)
                        self._hooked.add(id(m))
        weights = self._weights(state)
        self._frozen = {n: w.detach().clone() for n, w in weights.items()}
        n = len(exp)
        spe = math.ceil(n / state.batch_size) if n else 0
        self.total = self.iterations or self.epochs * spe
        return exp

    def pre_update(self, state: RunState, exp: Experience) -> None:
        tasks = list(exp.classes_by_task)
        if len(tasks) != 1:
            raise ConfigError(f"packnet trains one task per experience; experience has {tasks}")
        if state.lr_schedule is not None and self.retrain_lr_scale != 1:
            raise ConfigError(
                "packnet: strategy.retrain_lr_scale="
                f"{self.retrain_lr_scale} and an lr_schedule both set the learning rate; set "
                "strategy.retrain_lr_scale=1 or lr_schedule=null"
            )
        if self.total and self.total - round(self.total * self.retrain_share) < 1:
            raise ConfigError(
                f"packnet: strategy.retrain_share={self.retrain_share} leaves no training step "
                f"before pruning ({self.total} steps per experience)"
            )
        self.tasks.append(tasks[0])
        current = len(self.tasks)
        for name, w in self._weights(state).items():
            owner = self.owner.get(name)
            if owner is None:
                owner = torch.zeros(w.shape, dtype=torch.int16, device=w.device)
            self.owner[name] = torch.where(owner == 0, current, owner).to(torch.int16)
        self.step, self.pruned, self.lrs = 0, False, []

    def after_backward(self, state: RunState) -> None:
        current = len(self.tasks)
        for name, w in self._weights(state).items():
            if w.grad is not None:
                w.grad.masked_fill_(self.owner[name] != current, 0.0)

    @torch.no_grad()
    def after_step(self, state: RunState, batch, x, out) -> None:
        self._enforce(state)
        self.step += 1
        if not self.pruned and self.step == self.total - round(self.total * self.retrain_share):
            self._prune(state)
            self.lrs = [g["lr"] for g in state.optimizer.param_groups]
            for g in state.optimizer.param_groups:
                g["lr"] = g["lr"] * self.retrain_lr_scale

    def post_update(self, state: RunState, exp: Experience) -> None:
        if self.total and not self.pruned:  # retrain_share rounds to 0 steps: prune at the end
            with torch.no_grad():
                self._prune(state)
        for g, lr in zip(state.optimizer.param_groups, self.lrs, strict=False):
            g["lr"] = lr
        self.lrs = []

    @torch.no_grad()
    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        model, weights = state.model, self._weights(state)
        out = None
        for task in torch.unique(t).tolist():
            rows = (t == task).nonzero().flatten()
            level = self.tasks.index(task) + 1 if task in self.tasks else len(self.tasks)
            masked = {
                n: w * ((self.owner[n] >= 1) & (self.owner[n] <= level)).to(w.dtype)
                for n, w in weights.items()
                if n in self.owner
            }
            logits = functional_call(model, masked, (x[rows], t[rows]))
            if out is None:
                out = logits.new_empty((len(t), logits.shape[1]))
            out[rows] = logits
        return out

    # ------------------------------------------------------------------ the masks

    def masks(self) -> dict[str, Tensor]:
        """weight name → owner (0 free, k + 1 kept by the k-th task trained)."""
        return dict(self.owner)

    def _weights(self, state: RunState) -> dict[str, Tensor]:
        """The prunable weights: conv and linear weights of the backbone, by model name."""
        return {
            f"backbone.{name}.weight": m.weight
            for name, m in state.model.backbone.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))
        }

    def _enforce(self, state: RunState) -> None:
        current = len(self.tasks)
        for name, w in self._weights(state).items():
            owner = self.owner.get(name)
            if owner is None:
                continue
            old = (owner >= 1) & (owner < current)
            w.copy_(torch.where(old, self._frozen[name], w).masked_fill(owner == 0, 0.0))

    def _prune(self, state: RunState) -> None:
        current = len(self.tasks)
        for name, w in self._weights(state).items():
            mine = self.owner[name] == current
            values = w[mine].abs().flatten()
            k = round(self.prune_fraction * values.numel())
            if k == 0:
                continue
            cutoff = values.cpu().kthvalue(k).values.to(w.device)
            release = mine & (w.abs() <= cutoff)
            self.owner[name] = self.owner[name].masked_fill(release, 0)
            w.masked_fill_(release, 0.0)
        self.pruned = True

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return {
            "owner": dict(self.owner),
            "tasks": list(self.tasks),
            "step": self.step,
            "total": self.total,
            "pruned": self.pruned,
            "lrs": list(self.lrs),
        }

    def load_state_dict(self, state: dict) -> None:
        self.owner = dict(state["owner"])
        self.tasks = list(state["tasks"])
        self.step, self.total = int(state["step"]), int(state["total"])
        self.pruned, self.lrs = bool(state["pruned"]), list(state["lrs"])


def _eval_mode(module: nn.Module, args: tuple) -> None:
    if module.training:
        module.eval()
