"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

``pre_update``: the classes of the experience about to be trained are noted. ``post_update``: a
frozen copy of the model becomes the teacher, and the classes seen so far become the "old"
classes. ``penalty``: the weighted KL divergence between the teacher's and the model's
temperature-softened outputs (``temperature``; the paper uses T = 2), on every sample of the
minibatch. With a multi-head model every old task's head is distilled on the current data, as in
the paper (task-incremental); with a single or incremental head the old classes' units are
(class- and domain-incremental, as in van de Ven & Tolias 2019). State: teacher weights, old
classes and the classes of the experience being trained.

Which units the model's softmax covers (``distill_units``), for a single or incremental head:

- ``old`` (default): the old classes' units only, as Li & Hoiem and Avalanche: only the relative
  scores among old classes are kept; the new classes' units are free.
- ``seen``: every unit of the classes seen so far, the current experience's included, while the
  teacher's probability of the current experience's classes is 0: the target of van de Ven et
  al.'s code (its ``loss_fn_kd`` pads the teacher's probabilities with zeros up to the "active
  classes"). The distillation then also holds the new classes' share of the probability down on
  the new data. In the task scenario (multi-head) and in domain-IL both are the same.

How the terms are weighted (``weighting``), with c = 1, 2, ... the experience being trained:

- ``fixed`` (default): loss = cross-entropy + ``alpha`` · KL.
- ``context``: loss = (1/c) · cross-entropy + (1 − 1/c) · ``alpha`` · KL, the weighting of van
  de Ven & Tolias 2019 and van de Ven, Tuytelaars & Tolias 2022 ("the loss on the current data
  weighted by the relative importance 1/c of the new context"); ``alpha = T²`` gives their T²
  scaling of the distillation loss (Hinton et al. 2015). LwF then provides the runner's ``loss``
  hook, the (1/c)-weighted cross-entropy, so do not list it with another component that provides
  one (ER-ACE, iCaRL, X-DER).

c counts original experiences (``benchmark.origin``), so an online stream keeps the same c for
all the mini-experiences of one experience.

Continual unlearning (``forget``): classes that only forgotten experiences had stop being old
units, and the teacher, which learned from the forgotten data, is retaken from the unlearned model
at the next experience (so the order of the components in the strategy does not matter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import number_above, one_of, require
from clrun.components import RunState
from clrun.models import MultiHeadClassifier
from clrun.strategies.utils import frozen_copy

DISTILL_UNITS = ("old", "seen")
WEIGHTINGS = ("fixed", "context")


class LwF:
    def __init__(
        self,
        alpha: float = 1.0,
        temperature: float = 2.0,
        distill_units: str = "old",
        weighting: str = "fixed",
    ):
        require("LwF alpha", alpha, number_above(0))
        require("LwF temperature", temperature, number_above(0))
        require("LwF distill_units", distill_units, one_of(DISTILL_UNITS))
        require("LwF weighting", weighting, one_of(WEIGHTINGS))
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.distill_units, self.weighting = distill_units, weighting
        if weighting == "context":  # only then does LwF provide the classification loss
            self.loss = self._context_loss
        self.teacher: torch.nn.Module | None = None
        self.old_classes: list[int] = []
        self.current_classes: list[int] = []
        self._units: Tensor | None = None
        self._seen_units: Tensor | None = None  # old units, then the current experience's new ones
        self._saved_teacher: dict | None = None  # loaded from a checkpoint, built on first use
        self.forgotten: list[int] = []  # experiences unlearned so far
        self.retake_teacher = False  # set by forget: the next pre_update copies the model

    def _multi_head(self, state: RunState) -> bool:
        return isinstance(getattr(state.model, "head", None), MultiHeadClassifier)

    @staticmethod
    def context(state: RunState) -> int:
        """c: the number of the (original) experience being trained, from 1."""
        return state.benchmark.origin(state.experience) + 1

    def weights(self, c: int) -> tuple[float, float]:
        """(weight of the cross-entropy, weight of the KL) in experience c = 1, 2, ..."""
        if self.weighting == "fixed":
            return 1.0, self.alpha
        return 1.0 / c, (1.0 - 1.0 / c) * self.alpha

    def _context_loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        return self.weights(self.context(state))[0] * F.cross_entropy(out, batch.y)

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.retake_teacher:
            self._set_teacher(state, None)
            self.retake_teacher = False
        self.current_classes = list(exp.classes)
        self._seen_units = None

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor | None:
        if self._saved_teacher is not None:
            self._set_teacher(state, self._saved_teacher)
        if self.teacher is None:
            return None
        multi = self._multi_head(state)
        with torch.no_grad():
            old = self.teacher.forward_heads(x) if multi else self.teacher(x, batch.t)
        new = state.model.forward_heads(x)[: len(old)] if multi else out
        t, units = self.temperature, self._units
        log_p_old = F.log_softmax(old[..., units] / t, dim=-1)
        if self.distill_units == "seen" and not multi:
            if self._seen_units is None:  # once per experience: no host-to-device copy per step
                self._seen_units = self._seen(units)
            # the old units come first in ``seen``: the teacher's zeros on the rest add nothing
            log_p_new = F.log_softmax(new[..., self._seen_units] / t, dim=-1)[..., : len(units)]
        else:
            log_p_new = F.log_softmax(new[..., units] / t, dim=-1)
        kl = F.kl_div(log_p_new, log_p_old, log_target=True, reduction="sum")
        return self.weights(self.context(state))[1] * kl / x.shape[0]

    def _seen(self, units: Tensor) -> Tensor:
        """The old units, then the current experience's classes that are not old."""
        new = [c for c in self.current_classes if c not in set(self.old_classes)]
        return torch.cat([units, torch.tensor(new, dtype=units.dtype, device=units.device)])

    def post_update(self, state: RunState, exp: Experience) -> None:
        self.old_classes = sorted(set(self.old_classes) | set(exp.classes))
        self._set_teacher(state, None)

    def forget(self, state: RunState, experiences: list[int]) -> None:
        from clrun.unlearning import classes_only_in

        self.forgotten = sorted(set(self.forgotten) | set(experiences))
        gone = classes_only_in(state, self.forgotten)
        self.old_classes = [c for c in self.old_classes if c not in gone]
        self.retake_teacher = True

    def _set_teacher(self, state: RunState, weights: dict | None) -> None:
        self.teacher = frozen_copy(state.model, weights)
        self._units = torch.tensor(self.old_classes, device=state.device)
        self._seen_units, self._saved_teacher = None, None

    def state_dict(self) -> dict:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._saved_teacher
        return {
            "teacher": teacher,
            "old_classes": list(self.old_classes),
            "current_classes": list(self.current_classes),
            "forgotten": list(self.forgotten),
            "retake_teacher": self.retake_teacher,
        }

    def load_state_dict(self, state: dict) -> None:
        self.old_classes = list(state["old_classes"])
        self.current_classes = list(state.get("current_classes", []))
        self.forgotten = list(state.get("forgotten", []))
        self.retake_teacher = bool(state.get("retake_teacher", False))
        self.teacher, self._saved_teacher = None, state["teacher"]
