"""BiC: bias correction (Wu, Chen, Wang, Ye, Liu, Guo & Fu, "Large Scale Incremental Learning",
CVPR 2019).

Memory: the run's ``buffer`` (the paper: 2000 exemplars on CIFAR-100, chosen by herding as in
iCaRL; choose ``buffer=herding buffer.max_size=2000``). Two stages per experience; when each hook
runs and what it changes:

- ``train_data``: the experience's samples together with every exemplar, minus a held-out
  validation set of k samples per class, for the old classes (from their exemplars) and the new
  ones alike: k = ``val_ratio`` × (exemplars per old class), at least 1 (PyCIL's
  ``val_samples_per_class = int(split_ratio * memory_size / known_classes)``, split_ratio 0.1: the
  paper's 9:1 train/validation split of the old classes' exemplars, with as many new-class
  samples so that the validation set is balanced). The split is drawn with a generator seeded by
  the run's seed and the experience (a resumed run draws the same). First experience: no split.
- ``loss`` (stage 1, replaces the runner's cross-entropy): λ · KD + (1 − λ) · CE with
  λ = n_old / (n_old + n_new), n the numbers of old and new classes (the paper's Eq. 3); CE over
  the units of the classes seen so far; KD = −Σ_k softmax(ô_k/T) log softmax(o_k/T) over the old
  classes, T = ``temperature`` (2), ô the logits of the model as it was after the previous
  experience *with its bias correction applied* (the paper's old model).
- ``post_update`` (stage 2, from the second experience on): the model is frozen and a
  bias-correction layer q_k = α o_k + β for the new classes' logits (old classes' logits unchanged)
  is fitted on the held-out set: softmax cross-entropy of the corrected logits over the classes
  seen so far (the paper's Eq. 5), minimised over α, β (starting at 1, 0) with this component's
  own SGD (``bias_lr``, momentum ``bias_momentum``, weight decay ``bias_weight_decay``; the rate
  × ``bias_lr_decay`` at each of ``bias_milestones``; ``bias_epochs`` passes in minibatches of
  ``bias_batch_size``, shuffled by the component's seeded generator). The runner's optimiser is
  untouched. Then the experience is offered to the buffer (herding on the model's features) and a
  frozen copy of the model, with its α, β, becomes the next experience's old model.
- ``predict``: the model's logits with the current correction applied to the new classes of the
  last experience.

Where the paper is silent we follow PyCIL (G-U-N/PyCIL, models/bic.py, CIFAR-100 block): stage 2
runs as many epochs as stage 1 with the same schedule (250 epochs, lr 0.1, momentum 0.9, weight
decay 2e-4, milestones 100/150/200, decay 0.1, batch 128). Differences from PyCIL, each the
paper's: stage 2 minimises the cross-entropy of the corrected logits (PyCIL's code applies
``cross_entropy`` to their softmax); PyCIL keeps one (α, β) per past experience, each frozen after
its own stage 2, while the paper corrects only the newest classes, as here. The frozen model's
logits on the held-out samples are computed once, in eval mode, without augmentation (PyCIL
re-augments them every epoch with batch-norm in training mode). Class-incremental only, one head
over all classes. State: α, β, the corrected classes, the old classes, the old model with its α,
β.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrun.benchmarks import Experience
from clrun.buffers import Buffer
from clrun.checks import int_at_least, number_above, number_at_least, require
from clrun.components import RunState
from clrun.strategies.utils import (
    frozen_copy,
    offer,
    piece,
    require_class_il,
    soft_cross_entropy,
    with_memory,
)

__all__ = ["BiC", "correct_logits", "fit_bias"]


def correct_logits(out: Tensor, alpha: Tensor, beta: Tensor, new: Tensor) -> Tensor:
    """``out`` with the columns ``new`` replaced by α · o + β; every other column is copied as
    it is (bit for bit)."""
    if len(new) == 0:
        return out
    return out.index_copy(1, new, alpha.to(out.dtype) * out[:, new] + beta.to(out.dtype))


def fit_bias(
    logits: Tensor,
    y: Tensor,
    new: Tensor,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Sequence[int] = (),
    decay: float = 0.1,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """α, β minimising the softmax cross-entropy of ``correct_logits(logits, α, β, new)`` against
    ``y`` (column positions of ``logits``), by SGD from α = 1, β = 0: the paper's stage 2 on
    the frozen model's logits."""
    logits, y = logits.detach().float(), y.to(logits.device)
    alpha = nn.Parameter(torch.ones((), device=logits.device))
    beta = nn.Parameter(torch.zeros((), device=logits.device))
    opt = torch.optim.SGD([alpha, beta], lr=lr, momentum=momentum, weight_decay=weight_decay)
    n = len(y)
    with torch.enable_grad():
        for epoch in range(epochs):
            for group in opt.param_groups:
                group["lr"] = lr * decay ** sum(epoch >= m for m in milestones)
            order = torch.randperm(n, generator=generator).to(logits.device)
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                loss = F.cross_entropy(correct_logits(logits[idx], alpha, beta, new), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return alpha.detach().clone(), beta.detach().clone()


class BiC:
    def __init__(
        self,
        buffer: Buffer | None,
        temperature: float = 2.0,
        val_ratio: float = 0.1,
        bias_epochs: int = 250,
        bias_lr: float = 0.1,
        bias_momentum: float = 0.9,
        bias_weight_decay: float = 2e-4,
        bias_milestones: Sequence[int] = (100, 150, 200),
        bias_lr_decay: float = 0.1,
        bias_batch_size: int = 128,
        seed: int = 0,
    ):
        if buffer is None:
            raise ValueError("BiC keeps exemplars in the run's buffer: choose buffer=herding")
        self.buffer = buffer
        self.temperature = float(require("BiC temperature", temperature, number_above(0)))
        self.val_ratio = float(require("BiC val_ratio", val_ratio, number_above(0)))
        self.bias_epochs = require("BiC bias_epochs", bias_epochs, int_at_least(0))
        self.bias_lr = float(require("BiC bias_lr", bias_lr, number_above(0)))
        self.bias_momentum = float(require("BiC bias_momentum", bias_momentum, number_at_least(0)))
        wd = require("BiC bias_weight_decay", bias_weight_decay, number_at_least(0))
        self.bias_weight_decay = float(wd)
        self.bias_milestones = [
            require("BiC bias_milestones[]", m, int_at_least(1)) for m in bias_milestones
        ]
        self.bias_lr_decay = float(require("BiC bias_lr_decay", bias_lr_decay, number_above(0)))
        self.bias_batch_size = require("BiC bias_batch_size", bias_batch_size, int_at_least(1))
        self.seed = int(seed)
        self.old_classes: list[int] = []
        self.alpha, self.beta = torch.ones(()), torch.zeros(())
        self.corrected: list[int] = []  # the classes whose logits α, β correct
        self.teacher: nn.Module | None = None
        self._saved_teacher: dict | None = None
        self.teacher_bias: dict = {"alpha": torch.ones(()), "beta": torch.zeros(()), "classes": []}
        self._units: Tensor | None = None  # seen classes: old, then new
        self._validation: Experience | None = None  # the held-out samples of this experience

    # ---------------------------------------------------------------- the held-out split
    def train_data(self, state: RunState, exp: Experience) -> Experience:
        require_class_il("BiC", state)
        new = [c for c in exp.classes if c not in set(self.old_classes)]
        self._units = torch.tensor(self.old_classes + new, device=state.device)
        self._validation = None
        if not self.old_classes or len(self.buffer) == 0:
            return exp
        data = with_memory(self.buffer, exp)
        per_class = max(1, int(self.val_ratio * len(self.buffer) / len(self.old_classes)))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + exp.index)
        y = data.y.cpu()
        held = torch.zeros(len(y), dtype=torch.bool)
        for c in self.old_classes + new:
            members = torch.nonzero(y == c).flatten()
            take = members[torch.randperm(len(members), generator=gen)[:per_class]]
            held[take] = True
        held = held.to(data.y.device)
        self._validation = data.subset(torch.nonzero(held).flatten())
        return data.subset(torch.nonzero(~held).flatten())

    # ---------------------------------------------------------------- stage 1
    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        units = self._units
        pos = torch.full((out.shape[1],), -1, dtype=torch.long, device=out.device)
        pos[units] = torch.arange(len(units), device=out.device)
        ce = F.cross_entropy(out[:, units], pos[batch.y])
        n_old = len(self.old_classes)
        teacher = self._teacher(state)
        if teacher is None or n_old == 0:
            return ce
        with torch.no_grad():
            old = self._teacher_logits(teacher, x, batch.t)[:, units[:n_old]]
        lam = n_old / len(units)
        return (
            lam * soft_cross_entropy(out[:, units[:n_old]], old, self.temperature) + (1 - lam) * ce
        )

    # ---------------------------------------------------------------- stage 2
    def post_update(self, state: RunState, exp: Experience) -> None:
        new = [c for c in exp.classes if c not in set(self.old_classes)]
        self.alpha, self.beta, self.corrected = torch.ones(()), torch.zeros(()), []
        val = self._validation
        if self.old_classes and new and val is not None and len(val):
            units = torch.tensor(self.old_classes + new, device=state.device)
            logits = self._logits(state, val)[:, units]
            pos = torch.full((state.benchmark.n_classes,), -1, device=state.device)
            pos[units] = torch.arange(len(units), device=state.device)
            new_cols = torch.arange(len(self.old_classes), len(units), device=state.device)
            gen = torch.Generator().manual_seed(self.seed * 100_003 + exp.index + 50_000)
            self.alpha, self.beta = fit_bias(
                logits,
                pos[val.y],
                new_cols,
                self.bias_epochs,
                self.bias_lr,
                self.bias_momentum,
                self.bias_weight_decay,
                self.bias_milestones,
                self.bias_lr_decay,
                self.bias_batch_size,
                gen,
            )
            self.corrected = list(new)
        self.old_classes = self.old_classes + new
        self._validation = None
        offer(self.buffer, state, exp)
        self.teacher, self._saved_teacher = frozen_copy(state.model), None
        self.teacher_bias = {
            "alpha": self.alpha.clone(),
            "beta": self.beta.clone(),
            "classes": list(self.corrected),
        }

    @torch.no_grad()
    def _logits(self, state: RunState, samples: Experience, batch_size: int = 256) -> Tensor:
        model = state.model
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(samples), batch_size):
            b = piece(samples, i, i + batch_size)
            out.append(model(state.model_input(b.x, b.e), b.t).float())
        model.train(was_training)
        return torch.cat(out)

    # ---------------------------------------------------------------- evaluation
    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        out = state.model(x, t)
        new = torch.tensor(self.corrected, dtype=torch.long, device=out.device)
        return correct_logits(out, self.alpha.to(out.device), self.beta.to(out.device), new)

    def _teacher_logits(self, teacher: nn.Module, x: Tensor, t: Tensor) -> Tensor:
        out = teacher(x, t)
        b = self.teacher_bias
        new = torch.tensor(b["classes"], dtype=torch.long, device=out.device)
        return correct_logits(out, b["alpha"].to(out.device), b["beta"].to(out.device), new)

    def _teacher(self, state: RunState) -> nn.Module | None:
        if self._saved_teacher is not None:
            self.teacher = frozen_copy(state.model, self._saved_teacher)
            self._saved_teacher = None
        return self.teacher

    def state_dict(self) -> dict:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._saved_teacher
        return {
            "old_classes": list(self.old_classes),
            "alpha": self.alpha,
            "beta": self.beta,
            "corrected": list(self.corrected),
            "teacher": teacher,
            "teacher_bias": self.teacher_bias,
        }

    def load_state_dict(self, state: dict) -> None:
        self.old_classes = list(state["old_classes"])
        self.alpha, self.beta = state["alpha"], state["beta"]
        self.corrected = list(state["corrected"])
        self.teacher, self._saved_teacher = None, state["teacher"]
        self.teacher_bias = dict(state["teacher_bias"])
        self.teacher_bias["classes"] = list(self.teacher_bias["classes"])
