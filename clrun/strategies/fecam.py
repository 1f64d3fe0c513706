"""FeCAM (Goswami, Liu, Twardowski & van de Weijer, "FeCAM: Exploiting the Heterogeneity of
Class Distributions in Exemplar-Free Continual Learning", NeurIPS 2023): per-class prototypes and
covariances of a frozen embedding, and a Mahalanobis-distance classifier.

- ``pre_update``: refuses the domain-incremental scenario and online streams (one covariance per
  class, fit once from all the class's samples).
- ``post_update``: the embeddings of the experience's training data (no augmentation; the
  frozen-feature cache) are mapped to φ(f) = normalise(f), or normalise(f^β) with Tukey's ladder
  of powers when ``tukey_beta`` is set (β = 0.5 in the paper; it needs nonnegative embeddings,
  a ReLU backbone's). For each new class c: the mean μ_c and the unbiased covariance Σ_c of φ;
  shrinkage Σ ← Σ + γ₁·mean(diag Σ)·I + γ₂·mean(off-diagonal Σ)·(1 − I) (the mean over the
  non-zero off-diagonal entries, as the authors' ``shrink_cov``); the per-class normalisation of
  their ``normalize_cov``, Σ_ij ← Σ_ij / (σ_i σ_j) with σ = √diag Σ (a correlation matrix); then
  the pseudo-inverse P_c = Σ_c⁺ (float64, as their ``np.linalg.pinv``), kept as float32.
- ``predict``: logits = −(φ(f) − μ_c)ᵀ P_c (φ(f) − μ_c) for every class seen (the squared
  Mahalanobis distance; the authors take the argmin of the same distance); unseen classes get
  ``clrun.models.MASKED``. Before the first experience ends the model's own outputs are used.

The backbone: frozen from the start in the pre-trained setting (the authors' ViT scripts
``FeCAM_vit_*.py``, and ``first_session_training: false``); the paper's from-scratch setting
trains it on the first experience and freezes it after (``first_session_training: true``, through
:class:`~clrun.strategies.TrainOnly`). Defaults follow the ViT CIFAR-100 script: L2-normalised
embeddings, no Tukey transform (ViT embeddings have negative entries), γ₁ = 1, γ₂ = 0 (their
ImageNet-R script: 10 and 10; their ResNet configs: β = 0.5, γ₁ = γ₂ = 1). Where the authors'
ResNet code differs: it computes covariances on transformed but unnormalised embeddings and
shrinks twice; here φ is one map used for means, covariances and test samples alike.

Class- and task-incremental (a multi-head model's task-IL accuracy comes from the same scores
restricted to the task's classes). State: means (C, D), precision matrices P (C, D, D) — C·D²
float32 values (470 MB for 200 classes of 768-dimensional embeddings) — and the seen classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import boolean, int_at_least, number_at_least, number_in, optional, require
from clrun.components import RunState
from clrun.errors import ConfigError
from clrun.features import frozen_features
from clrun.models import MASKED

__all__ = ["FeCAM", "fecam_precision", "mahalanobis_logits"]


class FeCAM:
    def __init__(
        self,
        tukey_beta: float | None = None,
        gamma1: float = 1.0,
        gamma2: float = 0.0,
        normalize_cov: bool = True,
        batch_size: int = 512,
    ):
        beta = optional(number_in(0, 1, open_lo=True), "null (no transform)")
        require("FeCAM tukey_beta", tukey_beta, beta)
        require("FeCAM gamma1", gamma1, number_at_least(0))
        require("FeCAM gamma2", gamma2, number_at_least(0))
        require("FeCAM normalize_cov", normalize_cov, boolean())
        require("FeCAM batch_size", batch_size, int_at_least(1))
        self.tukey_beta, self.gamma1, self.gamma2 = tukey_beta, gamma1, gamma2
        self.normalize_cov, self.batch_size = normalize_cov, batch_size
        self.means: Tensor | None = None  # (n_classes, D) float32
        self.precisions: Tensor | None = None  # (n_classes, D, D) float32
        self.seen: Tensor | None = None  # (n_classes,) bool

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if state.benchmark.scenario == "domain":
            raise ConfigError(
                "FeCAM fits each class's covariance once, from the experience that brings it: "
                "benchmark.scenario=domain is not supported; use class or task"
            )
        if getattr(state.benchmark, "train_origin", None) is not None:
            raise ConfigError(
                "FeCAM fits each class's covariance once, from all the data of the experience "
                "that brings it: benchmark.online=true is not supported"
            )

    def embed(self, f: Tensor) -> Tensor:
        """φ: raw embeddings (B, D) → normalised (Tukey-transformed) float32 embeddings."""
        f = F.normalize(f.flatten(1).float(), dim=1)
        if self.tukey_beta is None:
            return f
        return F.normalize(f.clamp(min=0).pow(self.tukey_beta), dim=1)

    def post_update(self, state: RunState, exp: Experience) -> None:
        raw = frozen_features(state, exp, self.batch_size)
        if self.tukey_beta is not None and bool((raw < 0).any()):
            raise ConfigError(
                f"FeCAM strategy.tukey_beta={self.tukey_beta} needs nonnegative embeddings (a "
                "ReLU backbone's); this backbone gives negative values: set strategy.tukey_beta=null"
            )
        f = self.embed(raw)
        n, d = state.benchmark.n_classes, f.shape[1]
        if self.means is None:
            self.means = torch.zeros(n, d, device=f.device)
            self.precisions = torch.zeros(n, d, d, device=f.device)
            self.seen = torch.zeros(n, dtype=torch.bool, device=f.device)
        for c in exp.classes:
            fc = f[exp.y == c].double()
            if len(fc) < 2:
                raise ConfigError(
                    f"FeCAM needs at least 2 training samples of each class for a covariance; "
                    f"class {c} has {len(fc)} in experience {exp.index}"
                )
            self.means[c] = fc.mean(0).float()
            cov = torch.cov(fc.T)
            self.precisions[c] = fecam_precision(
                cov, self.gamma1, self.gamma2, self.normalize_cov
            ).float()
            self.seen[c] = True

    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        if self.means is None:
            return state.model(x, t)
        f = state.model.backbone(x)
        with torch.autocast(f.device.type, enabled=False):  # float32 under bf16 too
            return mahalanobis_logits(self.embed(f), self.means, self.precisions, self.seen)

    def predict_experience(self, state: RunState, exp: Experience) -> Tensor | None:
        """The scores of every sample of ``exp`` from its cached embeddings (None before the
        first fit: evaluation then calls :meth:`predict`)."""
        if self.means is None:
            return None
        f = frozen_features(state, exp, self.batch_size)
        return mahalanobis_logits(self.embed(f), self.means, self.precisions, self.seen)

    def state_dict(self) -> dict:
        return {"means": self.means, "precisions": self.precisions, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.means, self.precisions, self.seen = state["means"], state["precisions"], state["seen"]


def fecam_precision(cov: Tensor, gamma1: float, gamma2: float, normalize: bool) -> Tensor:
    """Shrink a covariance (the authors' ``shrink_cov``), optionally turn it into a
    correlation matrix (their ``normalize_cov``), and pseudo-invert it; float64."""
    cov = cov.double()
    d = cov.shape[0]
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)
    off = cov * (1 - eye)
    nonzero = off != 0
    off_mean = off.sum() / nonzero.sum() if bool(nonzero.any()) else off.sum()
    cov = cov + gamma1 * cov.diagonal().mean() * eye + gamma2 * off_mean * (1 - eye)
    if normalize:  # a dimension without variance (a dead ReLU unit, γ₁ = 0) stays as it is
        sd = cov.diagonal().sqrt()
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        cov = cov / (sd.unsqueeze(1) * sd.unsqueeze(0))
    return torch.linalg.pinv(cov, hermitian=True)


def mahalanobis_logits(f: Tensor, means: Tensor, precisions: Tensor, seen: Tensor) -> Tensor:
    """−(f − μ_c)ᵀ P_c (f − μ_c) for each seen class c (B, n_classes); MASKED elsewhere."""
    out = torch.full((f.shape[0], means.shape[0]), MASKED, device=f.device)
    for c in torch.nonzero(seen).flatten().tolist():
        diff = f - means[c]
        out[:, c] = -((diff @ precisions[c]) * diff).sum(1)
    return out
