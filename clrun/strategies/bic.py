"""BiC: bias correction (Wu, Chen, Wang, Ye, Liu, Guo & Fu, "Large Scale Incremental Learning",
CVPR 2019).

The paper's text could not be opened on this machine. What it says is taken from the passages
that FACIL (mmasana/FACIL, src/approach/bic.py, which follows the authors' code
wuyuebupt/LargeScaleIncrementalLearning) quotes with their section numbers: Sec. 3 "λ is set to
n/(n+m)"; Sec. 6.1 2,000 exemplars on CIFAR-100 and "the ratio of train/validation split on the
exemplars is 9:1 for CIFAR-100 and ImageNet-1000"; Sec. 6.2 T = 2 and weight decay 2e-4 on
CIFAR-100; Eqs. 4–5 the bias-correction layer on the new classes' logits, trained with
cross-entropy on the held-out set without temperature. Where those are silent we follow PyCIL
(G-U-N/PyCIL at 87cc411, models/bic.py and utils/inc_net.py ``IncrementalNetWithBias``).

Memory: the run's ``buffer`` (2,000 exemplars on CIFAR-100, herding as in iCaRL: choose
``buffer=herding buffer.max_size=2000``). Two stages per experience; when each hook runs and
what it changes:

- ``train_data``: the experience's samples together with every exemplar, minus a held-out
  validation set of k samples per class, for the old classes (from their exemplars) and the new
  ones alike: k = ``val_ratio`` × (exemplars per old class), at least 1 (PyCIL's
  ``val_samples_per_class = int(split_ratio * memory_size / known_classes)``, split_ratio 0.1:
  the 9:1 split of the old classes' exemplars, with as many samples of each new class, so that
  the validation set is balanced). The split is drawn anew each experience (PyCIL) with a
  generator seeded by the run's seed and the experience (a resumed run draws the same). First
  experience: no split.
- ``loss`` (stage 1, replaces the runner's cross-entropy): λ · KD + (1 − λ) · CE with
  λ = n_old / (n_old + n_new) (Sec. 3); CE over the units of the classes seen so far; KD =
  −Σ_k softmax(ô_k/T) log softmax(o_k/T) over the old classes, T = ``temperature`` (2), ô the
  logits of the model as it was after the previous experience. Both the model's and the old
  model's logits first pass through every past experience's frozen correction, as in PyCIL
  (``IncrementalNetWithBias.forward`` applies all ``bias_layers``; the old ones get learning
  rate 0) and FACIL (``bias_forward`` on both).
- ``post_update`` (stage 2, from the second experience on): the model is frozen and a new
  correction q_k = α o_k + β of this experience's new classes' logits is fitted on the held-out
  set (the other classes' logits keep their own frozen corrections): softmax cross-entropy of
  the corrected logits over the classes seen so far (Eq. 5), minimised over α, β (from 1, 0)
  with this component's own SGD (``bias_lr``, momentum ``bias_momentum``, weight decay
  ``bias_weight_decay``; the rate × ``bias_lr_decay`` at each of ``bias_milestones``;
  ``bias_epochs`` passes in minibatches of ``bias_batch_size``, shuffled by the component's
  seeded generator). The correction is kept, frozen, for the rest of the run (PyCIL appends one
  ``BiasLayer_BIC`` per task and trains only the last). The runner's optimiser is untouched.
  Then the experience is offered to the buffer (herding on the model's features) and a frozen
  copy of the model becomes the next experience's old model.
- ``predict``: the model's logits with every correction applied.

Stage-2 settings are PyCIL's: its models/bic.py reuses stage 1's schedule (170 epochs, lr 0.1,
momentum 0.9, weight decay 2e-4, milestones 60/100/140, decay 0.1, batch 128). Differences from
PyCIL: stage 2 minimises the cross-entropy of the corrected logits (Eq. 5; PyCIL's code applies
``cross_entropy`` to their softmax); the frozen model's logits on the held-out samples are
computed once, in eval mode, without augmentation (PyCIL re-augments them every epoch with
batch-norm in training mode). FACIL reports that the authors' code runs 200 stage-2 epochs and
adds 0.1 · β²/2 to the stage-2 loss; we keep PyCIL's weight decay on α, β instead.
Class-incremental only, one head over all classes. State: the corrections (α, β and their
classes), the old classes, the old model.
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
    Teacher,
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
        bias_epochs: int = 170,
        bias_lr: float = 0.1,
        bias_momentum: float = 0.9,
        bias_weight_decay: float = 2e-4,
        bias_milestones: Sequence[int] = (60, 100, 140),
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
        # one frozen (α, β) per past experience, on that experience's new classes (PyCIL's
        # bias_layers): {"alpha": Tensor, "beta": Tensor, "classes": list[int]}
        self.corrections: list[dict] = []
        self.teacher = Teacher()
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
        out = self.corrected(out)  # past experiences' frozen corrections (PyCIL, FACIL)
        pos = torch.full((out.shape[1],), -1, dtype=torch.long, device=out.device)
        pos[units] = torch.arange(len(units), device=out.device)
        ce = F.cross_entropy(out[:, units], pos[batch.y])
        n_old = len(self.old_classes)
        teacher = self.teacher.get(state.model)
        if teacher is None or n_old == 0:
            return ce
        with torch.no_grad():
            # the old model with its corrections: the same list, as none was added since
            old = self.corrected(teacher(x, batch.t))[:, units[:n_old]]
        lam = n_old / len(units)
        return (
            lam * soft_cross_entropy(out[:, units[:n_old]], old, self.temperature) + (1 - lam) * ce
        )

    # ---------------------------------------------------------------- stage 2
    def post_update(self, state: RunState, exp: Experience) -> None:
        new = [c for c in exp.classes if c not in set(self.old_classes)]
        val = self._validation
        if self.old_classes and new and val is not None and len(val):
            units = torch.tensor(self.old_classes + new, device=state.device)
            logits = self.corrected(self._logits(state, val))[:, units]
            pos = torch.full((state.benchmark.n_classes,), -1, device=state.device)
            pos[units] = torch.arange(len(units), device=state.device)
            new_cols = torch.arange(len(self.old_classes), len(units), device=state.device)
            gen = torch.Generator().manual_seed(self.seed * 100_003 + exp.index + 50_000)
            alpha, beta = fit_bias(
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
            self.corrections.append({"alpha": alpha.cpu(), "beta": beta.cpu(), "classes": new})
        self.old_classes = self.old_classes + new
        self._validation = None
        offer(self.buffer, state, exp)
        self.teacher.take(state.model)

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
    def corrected(self, out: Tensor) -> Tensor:
        """``out`` with every past experience's (α, β) applied to that experience's classes
        (disjoint sets, so the order does not matter)."""
        for c in self.corrections:
            new = torch.tensor(c["classes"], dtype=torch.long, device=out.device)
            out = correct_logits(out, c["alpha"].to(out.device), c["beta"].to(out.device), new)
        return out

    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        return self.corrected(state.model(x, t))

    def state_dict(self) -> dict:
        return {
            "old_classes": list(self.old_classes),
            "corrections": [dict(c, classes=list(c["classes"])) for c in self.corrections],
            "teacher": self.teacher.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.old_classes = list(state["old_classes"])
        self.corrections = [dict(c, classes=list(c["classes"])) for c in state["corrections"]]
        self.teacher.load_state_dict(state["teacher"])
