"""FOSTER: feature boosting and compression (Wang, Zhou, Ye & Zhan, "FOSTER: Feature Boosting
and Compression for Class-Incremental Learning", ECCV 2022).

Memory: the run's ``buffer`` (the paper: 2000 exemplars on CIFAR-100, 20 per class, chosen by
herding; choose ``buffer=herding buffer.max_size=2000``). From the second experience on, every
experience has two training phases: boosting (the runner's steps) and compression (a training
phase of its own, run by this component inside ``post_update``). When each hook runs and what it
changes:

- ``train_data``: the experience's samples together with every exemplar (PyCIL's ``appendent``);
  the class-balanced weights of the seen classes are computed from the class counts n_c of that
  data: w_c ∝ (1 − β) / (1 − β^{n_c}), normalised to sum to the number of seen classes (Cui et
  al.'s effective number of samples), with β = ``beta1`` (boosting) and ``beta2`` (compression).
- ``pre_update`` (sanctioned growth): the model becomes the boosting network: its backbone is
  frozen (no gradient; batch-norm in eval mode) and joined by a new extractor initialised as its
  copy; the features are the two concatenated (2d); a new head ``fc`` over 2d features scores
  every seen class (its old classes' weights on the old features copied from the old head, the
  rest freshly initialised); an auxiliary head ``fe_fc`` scores every seen class from the new
  features; the old head stays, frozen, scoring the old features. The runner then gets a fresh
  optimiser (``state.reset_optimizer``; PyCIL builds a new one each experience).
- ``loss`` (boosting, replaces the runner's cross-entropy): the logits-adjusted cross-entropy
  CE(o / w, y) of the boosting head (o divided by the class-balanced weights w of β1), plus the
  auxiliary cross-entropy CE(fe_fc(new features), y), plus ``lambda_okd`` · KD between the
  boosting head's old-class logits and the old head's logits on the old features
  (−Σ softmax(ô/T) log softmax(o/T), T = ``temperature``). In the first experience: CE alone.
- ``post_update`` (compression, from the second experience on): a student with the original
  architecture, initialised as the old model (old extractor, old head, freshly initialised units
  for the new classes), is trained for ``compression_epochs`` passes over the same data (new
  samples + exemplars, augmented as the runner's batches, minibatches of
  ``compression_batch_size`` in the order of this component's seeded generator) with its own SGD
  (``compression_lr``, momentum 0.9, no weight decay, cosine annealing to 0 over the epochs, once
  an epoch) on the balanced KD: the teacher's (the boosting network's, eval mode) softened
  probabilities multiplied by the class-balanced weights of β2 and renormalised, against the
  student's log-softmax at T. The student then replaces the boosting network in the model (so the
  model keeps its original size after every experience), the runner rebuilds its optimiser over
  it (``state.reset_optimizer``) so that the checkpoint matches the model, and the experience is
  offered to the buffer (herding on the student's features).

Where the paper is silent we follow PyCIL (G-U-N/PyCIL, models/foster.py, exps/foster.json and
utils/inc_net.py FOSTERNet): the KD is PyCIL's ``_KD_loss`` (no T² factor), the auxiliary head
covers every seen class, the new extractor starts as a copy of the old one, the new rows and new
columns of the boosting head are freshly initialised (``oofc: ft``), no weight aligning of the
teacher or the student (``is_teacher_wa``, ``is_student_wa`` false in foster.json; not
implemented), the compression optimiser has no weight decay. The class counts come from the data
(PyCIL hard-codes 500 per new CIFAR-100 class and the memory per old class). PyCIL selects the
exemplars with the boosting network's concatenated features; we use the compressed model's, the
one that will classify. Class-incremental only, one head over all classes. State: the old
classes, the compression generator.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrun.benchmarks import Experience
from clrun.buffers import Buffer
from clrun.checks import int_at_least, number_above, number_at_least, probability_below_one, require
from clrun.components import RunState
from clrun.models import CLModel
from clrun.models.heads import _Units
from clrun.strategies.utils import (
    offer,
    require_class_il,
    soft_cross_entropy,
    with_memory,
)
from clrun.strategies.wa import head_rows

__all__ = ["FOSTER", "BoostedBackbone", "BoostingHead", "class_balanced_weights"]


def class_balanced_weights(counts: Tensor, beta: float) -> Tensor:
    """w_c = (1 − β) / (1 − β^{n_c}), normalised to sum to the number of classes."""
    w = (1 - beta) / (1 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts.double()))
    return (w / w.sum() * len(counts)).float()


class BoostedBackbone(nn.Module):
    """The frozen old extractor and the new one side by side: features = [old(x), new(x)]."""

    grown = "foster"

    def __init__(self, old: nn.Module, new: nn.Module):
        super().__init__()
        self.old, self.new = old.requires_grad_(False), new

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.old(x).flatten(1), self.new(x).flatten(1)], dim=1)

    def train(self, mode: bool = True) -> BoostedBackbone:
        super().train(mode)
        self.old.eval()  # frozen: batch-norm keeps its running statistics (PyCIL's train())
        return self

    def get_extra_state(self) -> dict:
        return {"grown": self.grown}

    def set_extra_state(self, state: dict) -> None:
        pass


class BoostingHead(nn.Module):
    """``fc`` over the concatenated features (the model's logits), ``fe_fc`` over the new
    features (the auxiliary head) and the frozen ``original`` head over the old features."""

    def __init__(self, original: nn.Module, width: int, n_classes: int):
        super().__init__()
        self.original = original.requires_grad_(False)
        self.width, self.n_classes = width, n_classes
        self.fc, self.fe_fc = _Units(2 * width), _Units(width)
        self.features: Tensor | None = None  # the last training forward's, for the loss

    def adaptation(self, experience: Experience) -> bool:
        grew = self.fc.grow(experience.classes)
        return self.fe_fc.grow(experience.classes) or grew

    def forward(self, features: Tensor, t: Tensor | None = None) -> Tensor:
        if self.training:
            self.features = features
        return self.fc(features, self.n_classes)

    def forward_heads(self, features: Tensor) -> Tensor:
        return self.forward(features).unsqueeze(0)

    def auxiliary(self, features: Tensor, t: Tensor | None) -> tuple[Tensor, Tensor]:
        """(fe_fc logits on the new features, the original head's logits on the old ones)."""
        fe = self.fe_fc(features[:, self.width :], self.n_classes)
        with torch.no_grad():
            old = self.original(features[:, : self.width].detach(), t)
        return fe, old


def _width(head: nn.Module) -> int:
    if hasattr(head, "units"):
        return head.units.in_features
    return head.linear.in_features


def _n_classes(head: nn.Module) -> int:
    return head.n_classes if hasattr(head, "n_classes") else head.linear.out_features


def grow_like_checkpoint(model: CLModel) -> None:
    """Turn a freshly built model into a boosting network of the same layout (its weights are
    loaded right after): what :class:`~clrun.models.CLModel` calls for a checkpoint whose
    backbone says ``grown: foster``."""
    head = BoostingHead(model.head, _width(model.head), _n_classes(model.head))
    model.backbone = BoostedBackbone(model.backbone, copy.deepcopy(model.backbone))
    model.head = head


def boost(model: CLModel, old: list[int], seen: list[int]) -> None:
    """Grow ``model`` into the boosting network: old extractor frozen beside its copy, a head
    over both whose old-class weights on the old features are the old head's."""
    device = next(model.parameters()).device
    width = _width(model.head)
    old_linear, old_rows = head_rows(model, old)
    head = BoostingHead(model.head, width, _n_classes(model.head)).to(device)
    head.fc.grow(seen)
    head.fe_fc.grow(seen)
    rows = _positions(head.fc.classes, old)
    with torch.no_grad():
        head.fc.linear.weight[rows, :width] = old_linear.weight[old_rows]
        head.fc.linear.bias[rows] = old_linear.bias[old_rows]
    model.backbone = BoostedBackbone(model.backbone, copy.deepcopy(model.backbone))
    model.head = head


def _positions(classes: Tensor, wanted: list[int]) -> Tensor:
    w = torch.tensor(wanted, dtype=torch.long, device=classes.device)
    return (classes.unsqueeze(0) == w.unsqueeze(1)).long().argmax(1)


class FOSTER:
    def __init__(
        self,
        buffer: Buffer | None,
        beta1: float = 0.96,
        beta2: float = 0.97,
        lambda_okd: float = 1.0,
        temperature: float = 2.0,
        compression_epochs: int = 130,
        compression_lr: float = 0.1,
        compression_batch_size: int = 128,
        seed: int = 0,
    ):
        if buffer is None:
            raise ValueError("FOSTER keeps exemplars in the run's buffer: choose buffer=herding")
        self.buffer = buffer
        self.beta1 = float(require("FOSTER beta1", beta1, probability_below_one()))
        self.beta2 = float(require("FOSTER beta2", beta2, probability_below_one()))
        self.lambda_okd = float(require("FOSTER lambda_okd", lambda_okd, number_at_least(0)))
        self.temperature = float(require("FOSTER temperature", temperature, number_above(0)))
        self.compression_epochs = require(
            "FOSTER compression_epochs", compression_epochs, int_at_least(0)
        )
        self.compression_lr = float(
            require("FOSTER compression_lr", compression_lr, number_above(0))
        )
        self.compression_batch_size = require(
            "FOSTER compression_batch_size", compression_batch_size, int_at_least(1)
        )
        self.generator = torch.Generator().manual_seed(int(seed))
        self.old_classes: list[int] = []
        self._units: Tensor | None = None  # seen classes: old, then new
        self._w1: Tensor | None = None  # class-balanced weights of the seen classes (β1, β2)
        self._w2: Tensor | None = None

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        require_class_il("FOSTER", state)
        new = [c for c in exp.classes if c not in set(self.old_classes)]
        self._units = torch.tensor(self.old_classes + new, device=state.device)
        data = with_memory(self.buffer, exp)
        counts = torch.bincount(data.y, minlength=state.benchmark.n_classes)[self._units].cpu()
        self._w1 = class_balanced_weights(counts, self.beta1).to(state.device)
        self._w2 = class_balanced_weights(counts, self.beta2).to(state.device)
        return data

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.old_classes:
            boost(state.model, self.old_classes, self._units.tolist())
            state.reset_optimizer = True

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        units = self._units
        pos = torch.full((out.shape[1],), -1, dtype=torch.long, device=out.device)
        pos[units] = torch.arange(len(units), device=out.device)
        y = pos[batch.y]
        head = state.model.head
        if not isinstance(head, BoostingHead):
            return F.cross_entropy(out[:, units], y)
        features, head.features = head.features, None
        fe, old = head.auxiliary(features, batch.t)
        n_old = len(self.old_classes)
        logits = out[:, units]
        loss = F.cross_entropy(logits / self._w1, y) + F.cross_entropy(fe[:, units], y)
        kd = soft_cross_entropy(logits[:, :n_old], old[:, units[:n_old]], self.temperature)
        return loss + self.lambda_okd * kd

    def post_update(self, state: RunState, exp: Experience) -> None:
        if isinstance(state.model.head, BoostingHead):
            self._compress(state, with_memory(self.buffer, exp))
        new = [c for c in exp.classes if c not in set(self.old_classes)]
        self.old_classes = self.old_classes + new
        offer(self.buffer, state, exp)

    def _compress(self, state: RunState, data: Experience) -> None:
        """Feature compression: distil the boosting network into a student of the original
        architecture with the balanced KD, then put the student in the model's place."""
        model = state.model
        student = CLModel(copy.deepcopy(model.backbone.old), copy.deepcopy(model.head.original))
        student.requires_grad_(True).train()
        model.eval()
        params = list(student.parameters())
        opt = torch.optim.SGD(params, lr=self.compression_lr, momentum=0.9)
        units, t, n = self._units, self.temperature, len(data)
        epochs, bs = self.compression_epochs, self.compression_batch_size
        for epoch in range(epochs):
            for group in opt.param_groups:  # CosineAnnealingLR(T_max=epochs), once an epoch
                group["lr"] = self.compression_lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
            order = torch.randperm(n, generator=self.generator).to(state.device)
            for i in range(0, n, bs):
                b = data.subset(order[i : i + bs])
                x = state.model_input(b.x, b.e, train=True)
                with state.autocast():
                    with torch.no_grad():
                        soft = F.softmax(model(x, b.t)[:, units].float() / t, dim=1) * self._w2
                        soft = soft / soft.sum(1, keepdim=True)
                    log_p = F.log_softmax(student(x, b.t)[:, units].float() / t, dim=1)
                    loss = -(soft * log_p).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        model.backbone, model.head = student.backbone, student.head
        model.train()
        state.reset_optimizer = True  # the run's optimiser over the compressed model

    def state_dict(self) -> dict:
        return {"old_classes": list(self.old_classes), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.old_classes = list(state["old_classes"])
        self.generator.set_state(state["generator"])
