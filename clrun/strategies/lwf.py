"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017).

``post_update``: a frozen copy of the model becomes the teacher, and the classes seen so far
become the "old" output units. ``penalty``: ``alpha`` × KL divergence between the teacher's and
the model's temperature-softened outputs (``temperature``; the paper uses T = 2) over the old
units, on every sample of the minibatch. With a multi-head model every old task's head is
distilled on the current data, as in the paper (task-incremental); with a single or incremental
head the old classes' units are (class- and domain-incremental, as in van de Ven & Tolias 2019).
State: teacher weights and old classes.

Continual unlearning (``forget``): classes that only forgotten experiences had stop being old
units, and the teacher, which learned from the forgotten data, is retaken from the unlearned model
at the next experience (so the order of the components in the strategy does not matter).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.components import RunState
from clrun.models import MultiHeadClassifier


class LwF:
    def __init__(self, alpha: float = 1.0, temperature: float = 2.0):
        for name, v in (("alpha", alpha), ("temperature", temperature)):
            if not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"LwF {name}={v!r} must be a finite number > 0")
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.teacher: torch.nn.Module | None = None
        self.old_classes: list[int] = []
        self._units: Tensor | None = None
        self._saved_teacher: dict | None = None  # loaded from a checkpoint, built on first use
        self.forgotten: list[int] = []  # experiences unlearned so far
        self.retake_teacher = False  # set by forget: the next pre_update copies the model

    def _multi_head(self, state: RunState) -> bool:
        return isinstance(getattr(state.model, "head", None), MultiHeadClassifier)

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor | None:
        if self._saved_teacher is not None:
            self._set_teacher(state, self._saved_teacher)
        if self.teacher is None:
            return None
        with torch.no_grad():
            old = (
                self.teacher.forward_heads(x)
                if self._multi_head(state)
                else self.teacher(x, batch.t)
            )
        new = state.model.forward_heads(x)[: len(old)] if self._multi_head(state) else out
        units = self._units
        t = self.temperature
        log_p_old = F.log_softmax(old[..., units] / t, dim=-1)
        log_p_new = F.log_softmax(new[..., units] / t, dim=-1)
        kl = F.kl_div(log_p_new, log_p_old, log_target=True, reduction="sum")
        return self.alpha * kl / x.shape[0]

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.retake_teacher:
            self._set_teacher(state, None)
            self.retake_teacher = False

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
        teacher = copy.deepcopy(state.model)
        if weights is not None:
            teacher.load_state_dict(weights)
        self.teacher = teacher.eval().requires_grad_(False)
        self._units = torch.tensor(self.old_classes, device=state.device)
        self._saved_teacher = None

    def state_dict(self) -> dict:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._saved_teacher
        return {"teacher": teacher, "old_classes": list(self.old_classes),
                "forgotten": list(self.forgotten), "retake_teacher": self.retake_teacher}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.old_classes = list(state["old_classes"])
        self.forgotten = list(state.get("forgotten", []))
        self.retake_teacher = bool(state.get("retake_teacher", False))
        self.teacher, self._saved_teacher = None, state["teacher"]
