"""SimpleCIL (Zhou, Cai, Ye & Zhan, "Revisiting Class-Incremental Learning with Pre-Trained
Models: Generalizability and Adaptivity are All You Need", IJCV 2024): a prototype classifier on
the frozen embedding of a (pre-trained) backbone; also the nearest-class-mean classifier (NCM)
with ``metric=euclidean``.

- ``post_update``: the embeddings of the experience's training data (no augmentation; from the
  frozen-feature cache, :func:`clrun.features.frozen_features`) are summed per class; a class's
  prototype is the mean of all its embeddings seen so far.
- ``predict``: ``metric=cosine`` (SimpleCIL): the cosine similarity between the L2-normalised
  embedding and each L2-normalised prototype. The authors' code (LAMDA-PILOT
  ``models/simplecil.py``) writes the prototypes into the weights of a ``CosineLinear`` head whose
  scale σ starts at 1 and is never trained, so the logits are the cosines themselves (scale 1:
  the evaluation's cross-entropy is that of σ = 1). ``metric=euclidean`` (NCM): minus the squared
  Euclidean distance between the raw embedding and each prototype. Classes without a prototype
  get ``clrun.models.MASKED``; before the first experience ends the model's own outputs are used.

No gradient training: the strategy lists :class:`~clrun.strategies.TrainOnly` (``first: 0``)
before it; with another backbone setup (``strategy=ncm`` after a trained backbone) it is the
classifier alone. Works in every scenario: classes that recur (domain-incremental) average over
all their samples, so after T experiences the prototypes equal the class means over all the
data at once, in any order. State: per-class sums of embeddings (float64) and counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import int_at_least, one_of, require
from clrun.components import RunState
from clrun.features import frozen_features
from clrun.models import MASKED

__all__ = ["SimpleCIL"]

METRICS = ("cosine", "euclidean")


class SimpleCIL:
    def __init__(self, metric: str = "cosine", batch_size: int = 512):
        require("SimpleCIL metric", metric, one_of(METRICS))
        require("SimpleCIL batch_size", batch_size, int_at_least(1))
        self.metric = metric
        self.batch_size = batch_size  # feature-pass batch size (the frozen-feature cache)
        self.sums: Tensor | None = None  # (n_classes, D) float64 sums of embeddings
        self.counts: Tensor | None = None  # (n_classes,) samples per class

    def post_update(self, state: RunState, exp: Experience) -> None:
        f = frozen_features(state, exp, self.batch_size).double()
        n = state.benchmark.n_classes
        if self.sums is None:
            self.sums = torch.zeros(n, f.shape[1], dtype=torch.float64, device=f.device)
            self.counts = torch.zeros(n, dtype=torch.long, device=f.device)
        self.sums.index_add_(0, exp.y, f)
        self.counts += torch.bincount(exp.y, minlength=n)

    def prototypes(self) -> Tensor:
        """(n_classes, D) float32 class means (zero rows for classes not seen)."""
        return (self.sums / self.counts.clamp(min=1).unsqueeze(1)).float()

    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        if self.sums is None:
            return state.model(x, t)
        f = state.model.backbone(x).flatten(1).float()
        with torch.autocast(f.device.type, enabled=False):  # scores in float32 under bf16 too
            return prototype_logits(f, self.prototypes(), self.counts > 0, self.metric)

    def predict_experience(self, state: RunState, exp: Experience) -> Tensor | None:
        """The scores of every sample of ``exp`` from its cached embeddings (None before the
        first prototypes: evaluation then calls :meth:`predict`)."""
        if self.sums is None:
            return None
        f = frozen_features(state, exp, self.batch_size)
        return prototype_logits(f, self.prototypes(), self.counts > 0, self.metric)

    def state_dict(self) -> dict:
        return {"sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.counts = state["sums"], state["counts"]


def prototype_logits(f: Tensor, prototypes: Tensor, seen: Tensor, metric: str) -> Tensor:
    """Scores of embeddings ``f`` (B, D) against ``prototypes`` (C, D): cosine similarity, or
    minus the squared Euclidean distance; classes not ``seen`` get MASKED."""
    if metric == "cosine":
        scores = F.normalize(f, dim=1) @ F.normalize(prototypes, dim=1).T
    else:
        scores = -torch.cdist(f, prototypes).pow(2)
    return scores.masked_fill(~seen, MASKED)
