"""EASE: Expandable Subspace Ensemble (Zhou et al., "Expandable Subspace Ensemble for
Pre-Trained Model-Based Class-Incremental Learning", CVPR 2024).

- ``pre_update``: a new adapter set (:mod:`clrun.models.peft` kind ``adapter``: width 64, scale
  0.1) on the frozen pre-trained ViT for experience k, named ``ease<k>``; the earlier ones are
  frozen and switched off, so the model's forward pass (trained by the runner) is the ViT with
  adapter k and the head.
- ``loss``: cross-entropy over the experience's classes only (the authors' fresh head over the
  new classes: the units of the old classes get no gradient).
- ``post_update``: adapter k is frozen. Subspace j's embedding of a sample is the ViT's with
  adapter j alone; the sample's feature is the concatenation over all subspaces, D more per
  experience. Each new class gets its prototype (class mean, eval mode, no augmentation) in
  every subspace 0..k. Old classes have no data in the new subspaces: the semantic-guided
  prototype complement fills them, recomputed after every experience (the authors'
  ``recalc_sim``): for old experience i and later subspace d, with A the prototypes in subspace
  i of the classes first seen at experience d or later, B theirs in subspace d, and Â those of
  experience i's classes in subspace i, the complemented prototypes are softmax_rows(cos(Â, A))
  · B.
- ``predict``: the score of class c (seen at experience i) is Σ_j w_j cos(f_j, P[c, j]) over the
  subspaces j, with w_i = 1 and w_j = ``alpha`` / k for the others (the authors'
  ``forward_reweight``; k = the last experience's index).

Not included: the authors' options off by default (the pre-trained model's own embedding as one
more subspace, ``use_init_ptm``; exemplars). Class-incremental only; a timm ViT only. State: the
prototypes and which are computed, each class's experience; the adapters are in the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import int_at_least, number_at_least, require
from clrun.components import RunState
from clrun.models import MASKED, peft
from clrun.strategies.ptm import check_class_il, class_sums, embed, experience_cross_entropy


def complement(prototypes: Tensor, real: Tensor, class_exp: Tensor) -> Tensor:
    """Prototypes (n_classes, n_subspaces, D) with every old class's missing prototype in a later
    subspace reconstructed from the classes that have one there (the module docstring);
    ``real`` (n_classes, n_subspaces) marks those computed from data."""
    out = prototypes.clone()
    n_sub = prototypes.shape[1]
    for i in range(n_sub - 1):
        old = torch.nonzero(class_exp == i).flatten()
        for d in range(i + 1, n_sub):
            src = torch.nonzero((class_exp >= d) & real[:, d] & real[:, i]).flatten()
            if len(old) == 0 or len(src) == 0:
                continue
            a_hat = F.normalize(prototypes[old, i], dim=1)
            a = F.normalize(prototypes[src, i], dim=1)
            sim = torch.softmax(a_hat @ a.T, dim=1)
            out[old, d] = sim @ prototypes[src, d]
    return out


class EASE:
    def __init__(
        self, width: int = 64, scale: float = 0.1, dropout: float = 0.1, alpha: float = 0.1
    ):
        require("EASE width", width, int_at_least(1))
        require("EASE alpha", alpha, number_at_least(0))
        self.adapter = {"width": width, "scale": scale, "dropout": dropout}
        self.alpha = alpha
        self.prototypes: Tensor | None = None  # (n_classes, n_subspaces, D), complemented
        self.real: Tensor | None = None  # (n_classes, n_subspaces): computed from data
        self.class_exp: Tensor | None = None  # (n_classes,): a class's experience, or -1
        self._classes: Tensor | None = None

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        check_class_il(state, "EASE")
        self._classes = torch.tensor(exp.classes, device=state.device)
        return exp

    def pre_update(self, state: RunState, exp: Experience) -> None:
        name = f"ease{exp.index}"
        for other, old in peft.attachments(state.model).items():
            if other != name:
                old.set_trainable(False)
                old.active = False
        if name not in peft.attachments(state.model):
            peft.attach(state.model, "adapter", name, **self.adapter)

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        return experience_cross_entropy(out, batch.y, self._classes)

    def subspaces(self, state: RunState) -> list[str]:
        return [n for n in peft.attachments(state.model) if n.startswith("ease")]

    def subspace(self, state: RunState, name: str, x: Tensor) -> Tensor:
        """The embedding of model inputs ``x`` through the ViT with adapter ``name`` alone."""
        with peft.only(state.model, (name,)):
            return state.model.backbone(x)

    def features(self, state: RunState, x: Tensor) -> Tensor:
        """The concatenated embedding of all subspaces: (B, n_subspaces · D)."""
        return torch.cat([self.subspace(state, n, x) for n in self.subspaces(state)], dim=1)

    def post_update(self, state: RunState, exp: Experience) -> None:
        names = self.subspaces(state)
        peft.attachments(state.model)[names[-1]].set_trainable(False)
        n = state.benchmark.n_classes
        new = []
        for name in names:
            f = embed(state, exp, lambda x, name=name: self.subspace(state, name, x))
            sums, counts = class_sums(f, exp.y, n)
            new.append(sums / counts.clamp(min=1).unsqueeze(1))
        new = torch.stack(new, dim=1)  # (n_classes, n_subspaces, D)
        has = counts > 0
        if self.prototypes is None:
            self.real = torch.zeros(n, 0, dtype=torch.bool, device=new.device)
            self.prototypes = new.new_zeros(n, 0, new.shape[2])
            self.class_exp = torch.full((n,), -1, dtype=torch.long, device=new.device)
        grow = len(names) - self.prototypes.shape[1]
        self.prototypes = torch.cat([self.prototypes, new.new_zeros(n, grow, new.shape[2])], 1)
        self.real = torch.cat([self.real, self.real.new_zeros(n, grow)], 1)
        self.prototypes[has] = new[has]
        self.real[has] = True
        self.class_exp[has] = exp.index
        self.prototypes = complement(self.prototypes, self.real, self.class_exp)

    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        if self.prototypes is None:
            return state.model(x, t)
        names = self.subspaces(state)[: self.prototypes.shape[1]]
        last = len(names) - 1
        seen = self.class_exp >= 0
        logits = 0
        for j, name in enumerate(names):
            f = F.normalize(self.subspace(state, name, x).float(), dim=1)
            cos = f @ F.normalize(self.prototypes[:, j], dim=1).T
            own = self.class_exp == j
            weight = torch.where(own, 1.0, self.alpha / max(last, 1))
            logits = logits + cos * weight
        return logits.masked_fill(~seen, MASKED)

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes, "real": self.real, "class_exp": self.class_exp}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes, self.real = state["prototypes"], state["real"]
        self.class_exp = state["class_exp"]
