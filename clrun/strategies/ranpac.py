"""RanPAC (McDonnell, Gong, Parvaneh, Abbasnejad & van den Hengel, "RanPAC: Random Projections
and Pre-trained Models for Continual Learning", NeurIPS 2023): a fixed random projection of the
frozen embedding with a nonlinearity, and a ridge-regression classifier on it whose statistics
accumulate over experiences, so no sample is kept.

- ``post_update``: the embeddings f (D) of the experience's training data (no augmentation; the
  frozen-feature cache) are projected, h = ReLU(f W) with W ∈ R^{D×M} fixed, entries N(0, 1)
  drawn from the component's seed (``M=0``: h = f, the paper's "no RP" ablation). The Gram matrix
  G += Σ h hᵀ and the class-sum matrix C += Σ h yᵀ (y one-hot over all the benchmark's classes)
  accumulate in float64. The ridge parameter λ is chosen from ``10^k`` for the integers k in
  ``ridge_exponents`` (the authors' grid: k = −8 … 8) on the experience's own data, as the
  authors do (``optimise_ridge_parameter`` in RanPAC.py and PILOT's ``models/ranpac.py``): the
  first 80 % of its samples in a shuffled order (theirs: a shuffling data loader; here: a
  permutation from the component's seed) fit a ridge regression, the last 20 % score it by the
  mean squared error against the one-hot targets, and the λ with the least error wins. Then
  W_o = (G + λI)⁻¹ C (a float64 solve, as the authors' ``torch.linalg.solve``).
- ``predict``: logits = ReLU(f W) W_o (the authors' ``CosineLinear`` with ``use_RP``, a plain
  linear map without normalisation); classes not seen yet get ``clrun.models.MASKED``.

First-session adaptation (the paper's Phase 1, Algorithm 1): ``adapter`` names a
parameter-efficient module of :mod:`clrun.models.peft` (adapter | ssf | vpt_shallow | vpt_deep |
finetune; the authors' argument files use an AdaptFormer adapter on CIFAR-100 and SSF on
ImageNet-R). ``pre_update`` of the first experience attaches it to the model's ViT (whose own
weights it freezes; ``finetune`` trains the whole ViT), the runner trains it with the head on
experience 0 (the strategy's ``first_session_training`` lets :class:`~clrun.strategies.TrainOnly`
train that experience only) with its loss and optimiser, and ``post_update`` freezes it for good
before the first embeddings are taken. ``adapter: none`` with ``first_session_training`` trains
the model's own trainable parameters on experience 0 instead (full fine-tuning of the backbone).
Difference from the authors' code (RanPAC.py): the head trained in Phase 1 is the model's head
(``model.head``), not their cosine classifier with a learned scale; it is discarded afterwards in
both (Phase 2's ridge classifier replaces it).

The λ search fits on 80 % of a single experience, so the primal (M × M) or dual (n × n) form is
used, whichever is smaller; both give the same regression. Works in every scenario (targets are
the labels y; recurring classes accumulate); not in online streams (``pre_update`` refuses them). State: G, C, λ, the seen classes; W is redrawn from
the seed and W_o recomputed on load. Memory: G holds M² float64 values (800 MB for M = 10,000).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import Rule, int_at_least, is_int, one_of, require
from clrun.components import RunState
from clrun.errors import ConfigError
from clrun.features import frozen_features
from clrun.models import MASKED, peft

__all__ = ["RanPAC", "choose_ridge", "ridge_losses", "ridge_solve"]

NAME = "ranpac"  # the Phase 1 attachment's name in model.peft


class RanPAC:
    def __init__(
        self,
        M: int = 10000,  # noqa: N803 (the paper's name)
        ridge_exponents: tuple[int, int] = (-8, 8),
        batch_size: int = 512,
        seed: int = 0,
        adapter: str = "none",
        adapter_options: dict | None = None,
        train_first: bool = False,
    ):
        require("RanPAC M", M, int_at_least(0))
        require("RanPAC adapter", adapter, one_of(("none", *peft.ADAPTERS)))
        if adapter != "none":
            peft.check_options(adapter, dict(adapter_options or {}))
            if not train_first:
                raise ConfigError(
                    f"strategy.adapter={adapter} is trained in Phase 1, on the first experience: "
                    "set strategy.first_session_training=true (or strategy.adapter=none)"
                )
        self.adapter, self.adapter_options = adapter, dict(adapter_options or {})
        pair = Rule(
            lambda v: len(v) == 2 and all(is_int(k) for k in v) and v[0] <= v[1],
            "[lowest, highest] integer exponents",
        )
        require("RanPAC ridge_exponents", list(ridge_exponents), pair)
        require("RanPAC batch_size", batch_size, int_at_least(1))
        self.M, self.seed, self.batch_size = M, seed, batch_size
        self.ridges = [10.0**k for k in range(ridge_exponents[0], ridge_exponents[1] + 1)]
        self.G: Tensor | None = None  # (M, M) float64: Σ h hᵀ
        self.C: Tensor | None = None  # (M, n_classes) float64: Σ h yᵀ
        self.ridge: float | None = None  # λ of the last solve
        self.seen: Tensor | None = None  # (n_classes,) bool
        self.W_out: Tensor | None = None  # (M, n_classes) float32, from G, C, λ
        self._W: Tensor | None = None  # (D, M) the random projection, drawn from the seed

    def project(self, f: Tensor) -> Tensor:
        """h = ReLU(f W) for embeddings f (B, D) → (B, M) float32 (f itself when M = 0)."""
        f = f.flatten(1).float()
        if self.M == 0:
            return f
        if self._W is None or self._W.device != f.device:
            g = torch.Generator().manual_seed(self.seed)
            self._W = torch.randn(f.shape[1], self.M, generator=g).to(f.device)
        return F.relu(f @ self._W)

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if getattr(state.benchmark, "train_origin", None) is not None:
            raise ConfigError(
                "RanPAC chooses λ on a split of each experience's data and solves an M × M system "
                "after it: benchmark.online=true is not supported"
            )
        if self.adapter != "none" and NAME not in peft.attachments(state.model):
            # Phase 1: the module the runner trains on this (the first) experience
            peft.find_vit(state.model, f"RanPAC strategy.adapter={self.adapter}")
            peft.attach(state.model, self.adapter, NAME, **self.adapter_options)

    def post_update(self, state: RunState, exp: Experience) -> None:
        if self.adapter != "none":
            peft.attachments(state.model)[NAME].set_trainable(False)  # Phase 1 is over
        h = self.project(frozen_features(state, exp, self.batch_size)).double()
        y = F.one_hot(exp.y, state.benchmark.n_classes).double()
        if self.G is None:
            self.G = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64, device=h.device)
            self.C = torch.zeros(h.shape[1], y.shape[1], dtype=torch.float64, device=h.device)
            self.seen = torch.zeros(y.shape[1], dtype=torch.bool, device=h.device)
        self.G += h.T @ h
        self.C += h.T @ y
        self.seen |= y.sum(0) > 0
        g = torch.Generator().manual_seed(self.seed + 1 + exp.index)  # the λ split's order
        order = torch.randperm(len(h), generator=g).to(h.device)
        self.ridge = choose_ridge(h[order], y[order], self.ridges)
        self.W_out = ridge_solve(self.G, self.C, self.ridge)

    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        if self.W_out is None:
            return state.model(x, t)
        f = state.model.backbone(x)
        with torch.autocast(f.device.type, enabled=False):  # float32 under bf16 too
            return (self.project(f) @ self.W_out).masked_fill(~self.seen, MASKED)

    def predict_experience(self, state: RunState, exp: Experience) -> Tensor | None:
        """The scores of every sample of ``exp`` from its cached embeddings (None before the
        first fit: evaluation then calls :meth:`predict`)."""
        if self.W_out is None:
            return None
        f = frozen_features(state, exp, self.batch_size)
        # in pieces: the (N, M) random features of a whole experience can be large
        pieces = [self.project(piece) @ self.W_out for piece in f.split(self.batch_size)]
        return torch.cat(pieces).masked_fill(~self.seen, MASKED)

    def state_dict(self) -> dict:
        return {"G": self.G, "C": self.C, "ridge": self.ridge, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.G, self.C, self.ridge, self.seen = (
            state["G"],
            state["C"],
            state["ridge"],
            state["seen"],
        )
        self.W_out = None if self.G is None else ridge_solve(self.G, self.C, self.ridge)


def ridge_solve(G: Tensor, C: Tensor, ridge: float) -> Tensor:  # noqa: N803
    """W_o = (G + λI)⁻¹ C, solved in float64, returned as float32."""
    eye = torch.eye(G.shape[0], dtype=torch.float64, device=G.device)
    return torch.linalg.solve(G.double() + ridge * eye, C.double()).float()


def choose_ridge(h: Tensor, y: Tensor, ridges: list[float]) -> float:
    """The λ of ``ridges`` whose ridge regression fit on the first 80 % of (h, y) predicts the
    last 20 % with the least mean squared error (the first λ of equal ones)."""
    if int(h.shape[0] * 0.8) in (0, h.shape[0]):  # too few samples to hold any out
        return ridges[len(ridges) // 2]  # the grid's middle
    return ridges[int(ridge_losses(h, y, ridges).argmin())]


def ridge_losses(h: Tensor, y: Tensor, ridges: list[float]) -> Tensor:
    """For each λ, the mean squared error on the last 20 % of (h, y) of the ridge regression
    fit on the first 80 % (at least one sample on each side)."""
    n = int(h.shape[0] * 0.8)
    fit_h, fit_y, val_h, val_y = h[:n].double(), y[:n].double(), h[n:].double(), y[n:].double()
    losses = []
    if n >= fit_h.shape[1]:  # primal: (Gᵥ + λI)⁻¹ Cᵥ, Gᵥ = hᵀh (M × M)
        s, V = _psd_eigh(fit_h.T @ fit_h)
        proj_c, proj_val = V.T @ (fit_h.T @ fit_y), val_h @ V
        for r in ridges:
            losses.append(F.mse_loss(proj_val @ (proj_c / (s + r).unsqueeze(1)), val_y))
    else:  # dual: hᵀ (h hᵀ + λI)⁻¹ y, the same weights through an n × n matrix
        s, V = _psd_eigh(fit_h @ fit_h.T)
        proj_y, proj_val = V.T @ fit_y, (val_h @ fit_h.T) @ V
        for r in ridges:
            losses.append(F.mse_loss(proj_val @ (proj_y / (s + r).unsqueeze(1)), val_y))
    return torch.stack(losses)


def _psd_eigh(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of a Gram matrix, float64; rounding's tiny negative
    eigenvalues become 0 (a Gram matrix has none), so s + λ stays positive for every λ > 0."""
    s, V = torch.linalg.eigh(gram.double())
    return s.clamp(min=0), V
