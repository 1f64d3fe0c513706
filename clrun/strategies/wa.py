"""WA: knowledge distillation + weight aligning (Zhao, Xiao, Gan, Zhang & Xia, "Maintaining
Discrimination and Fairness in Class Incremental Learning", CVPR 2020).

The paper's text could not be opened on this machine (only its abstract: KD keeps old classes
discriminated, then weight aligning corrects the biased FC weights after normal training, with
no extra parameters or validation set), so no equation of it is cited here. The training loss
and T follow PyCIL (G-U-N/PyCIL at 87cc411, models/wa.py, where commit 716625e "add kd_lambda"
replaced CE + 2·KD by the λ weighting below) and agree with an independent FACIL-based
re-implementation (Tsebeb/cvww_cir_horde, src/approach/wa.py); weight aligning follows PyCIL's
``IncrementalNet.weight_align`` (utils/inc_net.py). Weight clipping is not in PyCIL; it is an
option (``--clip-head-weights``) of that FACIL-based re-implementation, and another
re-implementation lists it as a part of the paper it has not implemented yet
(runhang/Incremental-Learning-with-Weight-Aligning, README). That it is the paper's is therefore
unverified; it is on by default and ``clip_weights=false`` gives PyCIL's behaviour.

Memory: the run's ``buffer`` (2000 herding exemplars in PyCIL's exps/wa.json; choose
``buffer=herding buffer.max_size=2000``). When each hook runs and what it changes:

- ``train_data``: the experience's samples together with every exemplar in the buffer (PyCIL's
  ``appendent=self._get_memory()``), the classes seen so far noted (old, then new).
- ``loss`` (replaces the runner's cross-entropy): (1 − λ) · CE + λ · KD with
  λ = n_old / (n_old + n_new) (PyCIL's ``kd_lambda = known_classes / total_classes``). CE is the
  softmax cross-entropy over the units of the classes seen so far; KD = −Σ_k softmax(ô/T)_k
  log softmax(o/T)_k over the old classes' units, averaged over samples, no T² factor (PyCIL's
  ``_KD_loss``), ô the logits of the model as it was after the previous experience (after its
  weights were aligned), T = ``temperature`` (2, PyCIL). In the first experience: CE alone.
- ``after_step``: weight clipping (``clip_weights``): the head's weight vectors are clamped to
  be non-negative after every optimiser step; the biases are not clipped.
- ``post_update``: weight aligning, from the second experience on: the head's weight vectors of
  the new classes are multiplied by γ = mean_old ‖w‖ / mean_new ‖w‖, so that the mean norm of the
  new classes' vectors equals that of the old ones' (biases untouched, as PyCIL's
  ``weight_align``); then the experience is offered to the buffer (herding on the aligned
  model's backbone features) and a frozen copy of the model becomes the next experience's
  teacher (PyCIL's ``after_task``).

Class-incremental only, one head over all classes (``single`` or ``incremental``). State: the
teacher's weights, the old classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrun.benchmarks import Experience
from clrun.buffers import Buffer
from clrun.checks import boolean, number_above, require
from clrun.components import RunState
from clrun.models import IncrementalClassifier, SingleHead
from clrun.strategies.utils import (
    Teacher,
    offer,
    require_class_il,
    soft_cross_entropy,
    with_memory,
)

__all__ = ["WA", "align_weights", "head_rows"]


def head_rows(model: nn.Module, classes: list[int]) -> tuple[nn.Linear, Tensor]:
    """The model's classifier layer and the rows of its weight that score ``classes`` (a single
    head: the class indices; an incremental head: where it keeps each class's unit)."""
    head = model.head
    if isinstance(head, SingleHead):
        return head.linear, torch.tensor(
            classes, dtype=torch.long, device=head.linear.weight.device
        )
    if isinstance(head, IncrementalClassifier):
        units = head.units
        wanted = torch.tensor(classes, dtype=torch.long, device=units.classes.device)
        rows = torch.nonzero(torch.isin(units.classes, wanted)).flatten()
        return units.linear, rows
    raise TypeError(f"{type(head).__name__}: weight aligning needs a single or incremental head")


@torch.no_grad()
def align_weights(linear: nn.Linear, old_rows: Tensor, new_rows: Tensor) -> float:
    """Scale the weight vectors of ``new_rows`` by γ = mean ‖w_old‖ / mean ‖w_new‖ (in place);
    returns γ."""
    norms = linear.weight.norm(dim=1)
    gamma = norms[old_rows].mean() / norms[new_rows].mean()
    linear.weight[new_rows] *= gamma
    return float(gamma)


class WA:
    def __init__(self, buffer: Buffer | None, temperature: float = 2.0, clip_weights: bool = True):
        if buffer is None:
            raise ValueError("WA keeps exemplars in the run's buffer: choose buffer=herding")
        self.buffer = buffer
        self.temperature = float(require("WA temperature", temperature, number_above(0)))
        self.clip_weights = require("WA clip_weights", clip_weights, boolean())
        self.old_classes: list[int] = []
        self.teacher = Teacher()
        self._units: Tensor | None = None  # seen classes: old, then new
        self.last_gamma: float | None = None  # γ of the last alignment (for the tests and logs)

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        require_class_il("WA", state)
        new = [c for c in exp.classes if c not in set(self.old_classes)]
        self._units = torch.tensor(self.old_classes + new, device=state.device)
        return with_memory(self.buffer, exp)

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        units = self._units
        pos = torch.full((out.shape[1],), -1, dtype=torch.long, device=out.device)
        pos[units] = torch.arange(len(units), device=out.device)
        ce = F.cross_entropy(out[:, units], pos[batch.y])
        teacher = self.teacher.get(state.model)
        n_old = len(self.old_classes)
        if teacher is None or n_old == 0:
            return ce
        with torch.no_grad():
            old = teacher(x, batch.t)[:, units[:n_old]]
        kd = soft_cross_entropy(out[:, units[:n_old]], old, self.temperature)
        lam = n_old / len(units)
        return (1 - lam) * ce + lam * kd

    def after_step(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> None:
        if self.clip_weights:
            linear, _ = head_rows(state.model, [])
            with torch.no_grad():
                linear.weight.clamp_(min=0)

    def post_update(self, state: RunState, exp: Experience) -> None:
        new = [c for c in exp.classes if c not in set(self.old_classes)]
        if self.old_classes and new:
            linear, old_rows = head_rows(state.model, self.old_classes)
            _, new_rows = head_rows(state.model, new)
            self.last_gamma = align_weights(linear, old_rows, new_rows)
        self.old_classes = self.old_classes + new
        offer(self.buffer, state, exp)
        self.teacher.take(state.model)

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "old_classes": list(self.old_classes)}

    def load_state_dict(self, state: dict) -> None:
        self.old_classes = list(state["old_classes"])
        self.teacher.load_state_dict(state["teacher"])
