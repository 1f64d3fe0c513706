"""iCaRL: incremental classifier and representation learning (Rebuffi et al., CVPR 2017).

iCaRL keeps its own exemplar memory of ``memory_size`` (the paper's K) samples, split evenly over
the classes seen so far (:class:`~clrun.buffers.ClassBalancedBuffer`, ``selection=herding``;
the first K mod t classes keep one exemplar more).

- ``train_data``: the experience's samples together with all exemplars (the paper's training
  set for representation learning).
- ``loss`` (replaces the runner's cross-entropy): binary cross-entropy on the sigmoid outputs of
  the units of all classes seen so far, averaged over samples and units; the targets of the new
  classes' units are the one-hot labels, those of the old classes' units the sigmoid outputs of
  the model as it was before this experience (the distillation; eval mode, frozen).
- ``post_update``: the exemplar sets of old classes are cut to their new size by dropping their
  last-selected exemplars; each new class gets exemplars chosen by herding on L2-normalised
  backbone features (greedy: the sample bringing the mean of the chosen ones closest to the class
  mean, each sample once). Then the class means of the exemplars' normalised features are
  computed and normalised, and the model becomes the next experience's distillation teacher.
- ``predict``: nearest-mean-of-exemplars: a sample goes to the class whose mean is closest to its
  normalised feature (logits = minus the squared distance; classes without exemplars get
  ``clrun.models.MASKED``). Before the first experience ends there are no means and the model's
  own outputs are used.

Choices where the authors' code and the paper differ: the loss covers the units of the classes
seen so far, as in the paper (whose network gains outputs as classes arrive) and Avalanche; the
authors' Theano code has all 100 outputs from the start and gives unseen classes target 0. Herding
picks each sample once, the paper's rule (the code iterates Welling's herding, which may return to
a sample and then skips it). Not included: the code's class means over each exemplar and its
horizontally flipped copy (a CIFAR augmentation choice). Class-incremental only
(``benchmark.scenario=class``; any head). ``memory_size`` must be at least
``benchmark.n_classes``. State: the exemplars, the class means, the old classes, the teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience, concat
from clrun.buffers import ClassBalancedBuffer
from clrun.checks import int_at_least, require
from clrun.components import RunState
from clrun.config import ConfigError
from clrun.strategies.utils import backbone_features, frozen_copy, nearest_mean_logits

__all__ = ["ICaRL", "nearest_mean_logits"]


class ICaRL:
    def __init__(self, memory_size: int = 2000, seed: int = 0):
        require("iCaRL memory_size", memory_size, int_at_least(1))
        self.memory = ClassBalancedBuffer(memory_size, "class", "herding", seed=seed)
        self.old_classes: list[int] = []  # classes of the experiences before the current one
        self.class_means: Tensor | None = None  # (n_classes, d), zero rows for unseen classes
        self.has_mean: Tensor | None = None  # (n_classes,) bool
        self.teacher: torch.nn.Module | None = None
        self._saved_teacher: dict | None = None  # loaded from a checkpoint, built on first use
        self._units: Tensor | None = None  # seen classes of the current experience: old, then new
        self.retake_teacher = False  # set by forget: the next pre_update copies the model

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        if state.benchmark.scenario != "class":
            raise ConfigError(
                f"iCaRL is class-incremental only: benchmark.scenario={state.benchmark.scenario} "
                "is not supported; use benchmark.scenario=class"
            )
        if getattr(state.benchmark, "train_origin", None) is not None:
            raise ConfigError(
                "iCaRL selects exemplars from all the data of an experience at its end: "
                "benchmark.online=true is not supported"
            )
        if self.memory.max_size < state.benchmark.n_classes:
            raise ConfigError(
                f"iCaRL memory: strategy.memory_size={self.memory.max_size} must be at least the "
                f"number of classes, {state.benchmark.n_classes}, to keep one exemplar per class"
            )
        new = [c for c in exp.classes if c not in self.old_classes]
        self._units = torch.tensor(self.old_classes + new, device=state.device)
        if len(self.memory) == 0:
            return exp
        return concat([exp, self.memory.samples()], exp.index)

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        units = self._units
        pos = torch.full((out.shape[1],), -1, dtype=torch.long, device=out.device)
        pos[units] = torch.arange(len(units), device=out.device)
        target = F.one_hot(pos[batch.y].clamp(min=0), len(units)).float()
        teacher = self._teacher(state)
        if teacher is not None and self.old_classes:
            n_old = len(self.old_classes)
            with torch.no_grad():
                target[:, :n_old] = torch.sigmoid(teacher(x, batch.t)[:, units[:n_old]])
        return F.binary_cross_entropy_with_logits(out[:, units], target)

    def post_update(self, state: RunState, exp: Experience) -> None:
        self.old_classes = sorted(set(self.old_classes) | set(exp.classes))
        features = backbone_features(state)
        self.memory.update(exp, features=features)
        exemplars = self.memory.samples()
        f = features(exemplars)
        means = torch.zeros(state.benchmark.n_classes, f.shape[1], device=f.device)
        means.index_add_(0, exemplars.y, f)
        counts = torch.bincount(exemplars.y, minlength=state.benchmark.n_classes)
        self.has_mean = counts > 0
        self.class_means = F.normalize(means / counts.clamp(min=1).unsqueeze(1), dim=1)
        self._set_teacher(state, None)

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.retake_teacher:
            self._set_teacher(state, None)
            self.retake_teacher = False

    def forget(self, state: RunState, experiences: list[int]) -> None:
        """Continual unlearning: the forgotten experiences' exemplars leave the memory, classes
        left without exemplars lose their mean (never predicted again) and, if no retained
        experience has them, stop being old classes; the teacher is retaken from the unlearned
        model at the next experience."""
        from clrun.unlearning import classes_only_in

        self.memory.purge(experiences)
        if self.has_mean is not None:
            left = torch.zeros_like(self.has_mean)
            if len(self.memory):
                left[self.memory.data["y"].unique()] = True
            self.has_mean &= left
        gone = classes_only_in(state, experiences)
        self.old_classes = [c for c in self.old_classes if c not in gone]
        self.retake_teacher = self.teacher is not None or self._saved_teacher is not None

    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        if self.class_means is None:
            return state.model(x, t)
        return nearest_mean_logits(state.model.backbone(x), self.class_means, self.has_mean)

    def _teacher(self, state: RunState) -> torch.nn.Module | None:
        if self._saved_teacher is not None:
            self._set_teacher(state, self._saved_teacher)
        return self.teacher

    def _set_teacher(self, state: RunState, weights: dict | None) -> None:
        self.teacher, self._saved_teacher = frozen_copy(state.model, weights), None

    def state_dict(self) -> dict:
        teacher = self.teacher.state_dict() if self.teacher is not None else self._saved_teacher
        return {
            "memory": self.memory.state_dict(),
            "old_classes": list(self.old_classes),
            "class_means": self.class_means,
            "has_mean": self.has_mean,
            "teacher": teacher,
            "retake_teacher": self.retake_teacher,
        }

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.old_classes = list(state["old_classes"])
        self.class_means, self.has_mean = state["class_means"], state["has_mean"]
        self.teacher, self._saved_teacher = None, state["teacher"]
        self.retake_teacher = bool(state.get("retake_teacher", False))
