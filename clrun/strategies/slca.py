"""SLCA: Slow Learner with Classifier Alignment (Zhang et al., ICCV 2023).

- Slow learner: the whole model trains, the backbone at ``backbone_lr_scale`` (0.01) times the
  head's rate: ``lr_scales = {"backbone.": backbone_lr_scale}``, which the runner turns into two
  parameter groups of every optimiser it builds (:mod:`clrun.components`).
- ``loss``: cross-entropy over the current experience's classes only (the authors'
  ``logits[:, known_classes:]``).
- ``post_update``: the mean and covariance (unbiased, + ``cov_eps`` · I) of the backbone features
  of each of the experience's classes (eval mode, no augmentation; kept from then on). From the
  second experience on, classifier alignment: for ``ca_epochs`` epochs, ``ca_samples`` features
  per seen class are drawn from N(mean · (0.9 + 0.1 (k+1)/(t+1)), cov) (k: the class's
  experience, t: the current one: older classes' means shrink, as in the authors' code), shuffled,
  and the head alone is trained on them in batches of ``ca_samples`` by SGD (momentum 0.9, weight
  decay ``ca_weight_decay``, rate ``ca_lr`` annealed by a cosine over the epochs) with logit
  normalisation: the logits of the seen classes divided by the mean over experiences of the L2
  norm of each experience's logits, and by ``logit_norm`` (0.1; null: plain cross-entropy).

Sampling uses the component's own seeded generator (Cholesky factor of the covariance, in
float64), so a resumed run draws the same features. Class-incremental only; the head is the
model's (``model.head``; the authors' is a linear layer per task, the same function). State: the
per-class means and covariances (float32), the classes' experiences, the generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import int_at_least, number_above, number_at_least, optional, require
from clrun.components import RunState
from clrun.strategies.ptm import check_class_il, embed, experience_cross_entropy


class SLCA:
    def __init__(
        self,
        backbone_lr_scale: float = 0.01,
        ca_epochs: int = 5,
        ca_samples: int = 256,
        ca_lr: float = 0.01,
        ca_weight_decay: float = 5e-4,
        logit_norm: float | None = 0.1,
        cov_eps: float = 1e-4,
        seed: int = 0,
    ):
        require("SLCA backbone_lr_scale", backbone_lr_scale, number_at_least(0))
        require("SLCA ca_epochs", ca_epochs, int_at_least(0))
        require("SLCA ca_samples", ca_samples, int_at_least(1))
        require("SLCA ca_lr", ca_lr, number_above(0))
        require("SLCA ca_weight_decay", ca_weight_decay, number_at_least(0))
        require("SLCA logit_norm", logit_norm, optional(number_above(0), "null (no norm)"))
        require("SLCA cov_eps", cov_eps, number_at_least(0))
        self.lr_scales = {"backbone.": float(backbone_lr_scale)}
        self.ca_epochs, self.ca_samples, self.ca_lr = ca_epochs, ca_samples, ca_lr
        self.ca_weight_decay, self.logit_norm, self.cov_eps = ca_weight_decay, logit_norm, cov_eps
        self.generator = torch.Generator().manual_seed(seed)
        self.means: Tensor | None = None  # (n_classes, D)
        self.covs: Tensor | None = None  # (n_classes, D, D)
        self.class_exp: Tensor | None = None  # (n_classes,) the experience of each class, or -1
        self._classes: Tensor | None = None  # the current experience's classes

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        check_class_il(state, "SLCA")
        self._classes = torch.tensor(exp.classes, device=state.device)
        return exp

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        return experience_cross_entropy(out, batch.y, self._classes)

    def post_update(self, state: RunState, exp: Experience) -> None:
        n = state.benchmark.n_classes
        f = embed(state, exp, state.model.backbone).double()
        if self.means is None:
            d = f.shape[1]
            self.means = torch.zeros(n, d, device=f.device)
            self.covs = torch.zeros(n, d, d, device=f.device)
            self.class_exp = torch.full((n,), -1, dtype=torch.long, device=f.device)
        eye = torch.eye(f.shape[1], dtype=torch.float64, device=f.device)
        for c in exp.classes:
            fc = f[exp.y == c]
            self.means[c] = fc.mean(0).float()
            self.covs[c] = (torch.cov(fc.T) + self.cov_eps * eye).float()
            self.class_exp[c] = exp.index
        if exp.index > 0 and self.ca_epochs > 0:
            self.align(state, exp.index)

    def align(self, state: RunState, current: int) -> None:
        """Classifier alignment: train the head on features drawn from the class Gaussians."""
        head = state.model.head
        seen = torch.nonzero(self.class_exp >= 0).flatten()
        params = [p for p in head.parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            params, lr=self.ca_lr, momentum=0.9, weight_decay=self.ca_weight_decay
        )
        factors = [self._factor(c, current) for c in seen.tolist()]
        chol = [self._sqrt_cov(c) for c in seen.tolist()]
        was_training = head.training
        head.train()
        for epoch in range(self.ca_epochs):
            for g in opt.param_groups:  # CosineAnnealingLR(T_max=ca_epochs), stepped per epoch
                g["lr"] = self.ca_lr * 0.5 * (1 + math.cos(math.pi * epoch / self.ca_epochs))
            feats, labels = [], []
            for i, c in enumerate(seen.tolist()):
                z = torch.randn(self.ca_samples, self.means.shape[1], generator=self.generator)
                z = z.double().to(self.means.device)
                mean = self.means[c].double() * factors[i]
                feats.append((mean + z @ chol[i].T).float())
                labels.append(torch.full((self.ca_samples,), c, device=self.means.device))
            feats, labels = torch.cat(feats), torch.cat(labels)
            order = torch.randperm(len(labels), generator=self.generator).to(labels.device)
            feats, labels = feats[order], labels[order]
            for i in range(0, len(labels), self.ca_samples):
                f, y = feats[i : i + self.ca_samples], labels[i : i + self.ca_samples]
                logits = self._aligned_logits(head(f, None)[:, seen], seen)
                pos = torch.full_like(self.class_exp, -1)
                pos[seen] = torch.arange(len(seen), device=seen.device)
                loss = F.cross_entropy(logits, pos[y])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        head.train(was_training)

    def _factor(self, c: int, current: int) -> float:
        return 0.9 + 0.1 * (int(self.class_exp[c]) + 1) / (current + 1)

    def _sqrt_cov(self, c: int) -> Tensor:
        cov = self.covs[c].double()
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info) == 0:
            return chol
        values, vectors = torch.linalg.eigh(cov)  # not positive definite in float32: clamp
        return vectors * values.clamp(min=0).sqrt()

    def _aligned_logits(self, logits: Tensor, seen: Tensor) -> Tensor:
        """The authors' logit normalisation: divide by the mean per-experience logit norm."""
        if self.logit_norm is None:
            return logits
        exps = self.class_exp[seen]
        norms = [
            logits[:, exps == k].norm(dim=1, keepdim=True) + 1e-7 for k in exps.unique().tolist()
        ]
        return logits / torch.cat(norms, dim=1).mean(1, keepdim=True) / self.logit_norm

    def state_dict(self) -> dict:
        return {
            "means": self.means,
            "covs": self.covs,
            "class_exp": self.class_exp,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.means, self.covs, self.class_exp = state["means"], state["covs"], state["class_exp"]
        self.generator.set_state(state["generator"])
