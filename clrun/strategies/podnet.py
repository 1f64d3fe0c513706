"""PODNet: Pooled Outputs Distillation for Small-Tasks Incremental Learning (Douillard, Cord,
Ollion, Robert & Valle, ECCV 2020).

The model's head becomes a local similarity classifier (LSC, :class:`~clrun.models.
CosineClassifier` with ``proxies`` K per class): ŷ_c = Σ_k softmax_k(cos(h, θ_{c,·})) cos(h,
θ_{c,k}), logits η·ŷ with a learned η (initial 1). Exemplars come from the run's buffer
(``buffer=herding`` by the strategy's YAML; ``buffer.max_per_group=20`` with
``buffer.max_size=2000`` is the paper's 20 per class).

- ``train_data``: the experience's samples together with every exemplar in the buffer.
- ``pre_update``: the first time, the LSC replaces the model's head. New classes get K proxies:
  in the first experience drawn from N(0, 1/d) (the code's Kaiming-normal), later imprinted
  (the code's ``weight_generation: imprinted, multi_class_diff: kmeans``): the K k-means
  centres of the class's normalised features, times the mean norm of the proxies so far. The
  classes learnt so far become old and their proxies fixed (the code's ``groupwise_factors:
  old_weights: 0``; η keeps training). A fresh optimiser (the code builds one per task).
- ``loss`` (replaces cross-entropy): the NCA loss on the LSC (:func:`nca`) in the form the
  authors ran (``nca_form=code``, the default; ``inclearn/lib/losses/base.py::nca`` with the
  options' ``exclude_pos_denominator: true`` and ``hinge_proxynca`` left false): z = η·(ŷ − δ)
  for EVERY class (the code builds a target-only margin tensor but subtracts the scalar δ from
  all similarities), shifted by the row maximum, the positive's term in the denominator exp(0):
  the margin cancels, and the loss is the cross-entropy of η·ŷ when the target scores highest
  (never negative, so the code's optional hinge would change nothing). η is the code's
  ``FactorScalar`` (``postprocessor_config: learned_scaling, initial_value: 1``): learned, not
  clamped, in the main optimiser with its learning rate and weight decay, fixed during the
  finetuning. Its gradient raises it whenever the target scores highest, so it stays positive
  (Split MNIST, MLP: 1 → 13.6). ``nca_form=hinge``: the margin taken off the target only, the
  positive out of the denominator, hinged at 0, [log Σ_{c≠y} exp(η ŷ_c) − η(ŷ_y − δ)]₊: what
  an earlier version of this module gave as the paper's equation, which could not be read here
  (unverified); the code has no such form. A margin off the target only lowers η on every
  sample that misses it: the earlier ``code`` form took it off the target only, and on Split
  MNIST (MLP, SGD 0.1) η fell through 0, the logits inverted, final accuracy ~0.
- ``penalty`` (from the second experience on): POD-spatial on the output of every stage of the
  backbone (:func:`~clrun.strategies.utils.stage_modules`) and POD-flat on the final embedding,
  against the model as it was before this experience (eval mode), each weighted
  λ·√(classes seen / new classes) (``adaptive``; the code's ``scheduled_factor``).
  POD-spatial per stage: square the map, sum it over the width and over the height, concatenate
  the two poolings (C·H + C·W values), L2-normalise, the Euclidean distance old-to-new averaged
  over the minibatch; the mean over stages (the code's ``losses.pod``, ``collapse_channels:
  spatial``). POD-flat: mean(1 − cos(h_old, h)) (the code's ``embeddings_similarity``).
- ``after_backward``: every gradient clamped to ±``grad_clip`` (the code's hooks on every
  parameter, ``torch.clamp(grad, -5, 5)``).
- ``post_update``: the buffer takes the experience (herding on the current features); from the
  second experience on, class-balanced finetuning (``finetune``): only the proxies (old and new;
  η and the backbone fixed, batch norm in eval mode) are trained with the NCA loss on the
  exemplars alone (every class the same share: the code's ``sampling: undersampling, tuning:
  classifier``), SGD with momentum 0.9 and weight decay at ``finetune_lr`` for
  ``finetune_epochs``, no schedule (the code's ``finetuning_config``; its ±5 gradient clamp
  stays on there, not here); the class
  means of the exemplars for ``classifier=nme``; the model becomes the next teacher.
- ``predict``: ``classifier=cnn`` the LSC's logits η·ŷ (the code's ``eval_type: cnn``, which
  takes ŷ before η: the same ranking while η > 0), ``nme`` the nearest mean of exemplars.

Where the paper is silent: the authors' code (arthurdouillard/incremental_learning.pytorch,
``inclearn/models/podnet.py``, ``inclearn/lib/losses/distillation.py``,
``inclearn/lib/losses/base.py``, ``inclearn/lib/network/classifiers.py``,
``inclearn/lib/network/postprocessors.py``, ``options/podnet/podnet_cnn_cifar100.yaml``). The
code's ``neg_stable_cosine_distance``, −‖ĥ − θ̂‖² = 2·cos − 2, is the default similarity
(``similarity=cosine``: the cosine). K-means: k-means++ seeding and Lloyd's iterations
(the code calls scikit-learn's KMeans), seeded by the run. Stages of the MLP and the small CNN
are ours (see ``stage_modules``): the paper distils ResNet stages. Class-incremental only
(``benchmark.scenario=class``, a single or incremental head; ``model=mlp``, ``cnn`` or a CIFAR
ResNet); the buffer must be class-balanced by class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience, concat
from clrun.checks import boolean, int_at_least, number_above, number_at_least, one_of, require
from clrun.components import RunState
from clrun.models.cosine import CosineClassifier, use_cosine_head
from clrun.strategies.lucir import (
    CLASSIFIERS,
    check_exemplar_setting,
    class_features,
    exemplar_means,
)
from clrun.strategies.utils import (
    FeatureTap,
    Teacher,
    nearest_mean_logits,
    offer,
    stage_modules,
    train_params,
)

__all__ = ["PODNet", "kmeans", "nca", "pod_flat", "pod_spatial"]

NCA_FORMS = ("code", "hinge")
SIMILARITIES = ("neg_squared_distance", "cosine")


def pod_spatial(old: list[Tensor], new: list[Tensor]) -> Tensor:
    """POD-spatial over stages: per stage (B, C, H, W) maps (a (B, C) vector is a C × 1 × 1
    map), the width and height poolings of the squared maps, concatenated and L2-normalised;
    the mean over the minibatch of their Euclidean distance; the mean over stages."""
    total = new[0].new_zeros(())
    for a, b in zip(old, new, strict=True):
        if a.dim() == 2:
            a, b = a[:, :, None, None], b[:, :, None, None]
        a, b = a.pow(2), b.pow(2)
        a = torch.cat([a.sum(3).flatten(1), a.sum(2).flatten(1)], 1)  # over W: C·H, over H: C·W
        b = torch.cat([b.sum(3).flatten(1), b.sum(2).flatten(1)], 1)
        total = total + (F.normalize(a, dim=1) - F.normalize(b, dim=1)).norm(dim=1).mean()
    return total / len(new)


def pod_flat(old: Tensor, new: Tensor) -> Tensor:
    """POD-flat on the final embedding: mean(1 − cos(h_old, h))."""
    return (1 - F.cosine_similarity(old.flatten(1), new.flatten(1), dim=1)).mean()


def nca(logits: Tensor, y: Tensor, margin: Tensor | float, form: str = "code") -> Tensor:
    """NCA loss with margin, averaged over samples: ``logits`` are η·ŷ, ``margin`` is η·δ.

    ``hinge`` (not in the authors' code; see the module docstring): z = logits with the margin
    taken off the target only, [log Σ_{c≠y} exp z_c − z_y]₊ (the positive out of the denominator,
    hinged at 0).

    ``code`` (what the authors ran, ``inclearn/lib/losses/base.py::nca`` with
    ``exclude_pos_denominator: true``, ``hinge_proxynca: false``): the code builds a per-target
    margin tensor but subtracts the scalar margin from EVERY similarity, z = η·(ŷ − δ), so the
    margin cancels in the shift by the row maximum M: (M − z_y) + log(1 + Σ_{c≠y} exp(z_c − M)),
    the cross-entropy of η·ŷ when the target scores highest (the positive's term in the
    denominator is exp(0) = 1), never negative. Its gradient raises η whenever the target scores
    highest, so η stays positive; a target-only margin instead lowers η on every sample whose
    margin is not met, which on 2-class experiences drives η through 0."""
    rows = torch.arange(len(y), device=y.device)
    if form == "hinge":
        z = logits.clone()
        z[rows, y] = z[rows, y] - margin
        neg = z.index_put((rows, y), torch.tensor(float("-inf"), device=z.device))
        return (torch.logsumexp(neg, dim=1) - z[rows, y]).clamp(min=0).mean()
    z = logits - margin  # every class, as the code does (no effect on the loss: kept to say so)
    z = z - z.max(1, keepdim=True).values  # the code's shift (the gradient flows through it)
    rest = z.index_put((rows, y), torch.zeros((), device=z.device))
    return (torch.logsumexp(rest, dim=1) - z[rows, y]).mean()


def kmeans(x: Tensor, k: int, generator: torch.Generator, iters: int = 300) -> Tensor:
    """``k`` centres of the rows of ``x``: k-means++ seeding, then Lloyd's iterations until the
    assignment stops changing. Fewer rows than ``k``: the rows, repeated."""
    n = x.shape[0]
    if n <= k:
        return x[torch.arange(k) % n]
    x64 = x.double()
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x64[first]]
    for _ in range(1, k):
        d2 = torch.cdist(x64, torch.stack(centres)).pow(2).min(1).values
        pick = torch.multinomial((d2 / d2.sum()).cpu(), 1, generator=generator)
        centres.append(x64[int(pick)])
    c = torch.stack(centres)
    assign = None
    for _ in range(iters):
        new = torch.cdist(x64, c).argmin(1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x64[assign == j]
            if len(members):
                c[j] = members.mean(0)
    return c.to(x.dtype)


class PODNet:
    def __init__(
        self,
        buffer=None,
        proxies: int = 10,
        nca_margin: float = 0.6,
        nca_form: str = "code",
        similarity: str = "neg_squared_distance",
        pod_spatial: float = 3.0,
        pod_flat: float = 1.0,
        adaptive: bool = True,
        imprint: bool = True,
        grad_clip: float | None = 5.0,
        classifier: str = "cnn",
        finetune: bool = True,
        finetune_epochs: int = 20,
        finetune_lr: float = 0.05,
        finetune_weight_decay: float = 5e-4,
        seed: int = 0,
    ):
        require("strategy.proxies", proxies, int_at_least(1))
        require("strategy.nca_margin", nca_margin, number_at_least(0))
        require("strategy.nca_form", nca_form, one_of(NCA_FORMS))
        require("strategy.similarity", similarity, one_of(SIMILARITIES))
        require("strategy.pod_spatial", pod_spatial, number_at_least(0))
        require("strategy.pod_flat", pod_flat, number_at_least(0))
        require("strategy.adaptive", adaptive, boolean())
        require("strategy.imprint", imprint, boolean())
        if grad_clip is not None:
            require("strategy.grad_clip", grad_clip, number_above(0))
        require("strategy.classifier", classifier, one_of(CLASSIFIERS))
        require("strategy.finetune", finetune, boolean())
        require("strategy.finetune_epochs", finetune_epochs, int_at_least(0))
        require("strategy.finetune_lr", finetune_lr, number_above(0))
        require("strategy.finetune_weight_decay", finetune_weight_decay, number_at_least(0))
        self.buffer, self.proxies, self.similarity = buffer, proxies, similarity
        self.margin, self.nca_form = float(nca_margin), nca_form
        self.spatial_weight, self.flat_weight = float(pod_spatial), float(pod_flat)
        self.adaptive, self.imprint, self.grad_clip = adaptive, imprint, grad_clip
        self.classifier, self.finetune = classifier, finetune
        self.finetune_epochs, self.finetune_lr = finetune_epochs, float(finetune_lr)
        self.finetune_wd = float(finetune_weight_decay)
        self.generator = torch.Generator().manual_seed(seed)  # k-means, finetuning order
        self.factor = 1.0  # √(classes seen / new classes) of the current experience
        self.class_means: Tensor | None = None
        self.has_mean: Tensor | None = None
        self.teacher = Teacher()
        self.tap = FeatureTap()  # stage outputs and embeddings of the model and the teacher

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        check_exemplar_setting(state, self.buffer, "PODNet")
        backbone = state.model.backbone
        self.tap.watch([*stage_modules(backbone, "PODNet"), backbone])
        if len(self.buffer) == 0:
            return exp
        return concat([exp, self.buffer.samples()], exp.index)

    def pre_update(self, state: RunState, exp: Experience) -> None:
        use_cosine_head(state.model, self.proxies, "PODNet", False, self.similarity)
        head = state.model.head
        new = [c for c in exp.classes if c not in set(head.classes.tolist())]
        weights = None
        if self.imprint and len(head.classes) and new:
            with torch.no_grad():
                norm = head.weight.norm(dim=1).mean()
                feats = class_features(state, exp, new)
                if self.proxies == 1:
                    weights = torch.stack([F.normalize(f.mean(0), dim=0) for f in feats])
                else:
                    weights = torch.cat([kmeans(f, self.proxies, self.generator) for f in feats])
                weights = weights * norm
        head.grow(new, weights, init="normal")
        seen = len(head.classes)
        self.factor = math.sqrt(seen / max(len(new), 1)) if self.adaptive else 1.0
        state.reset_optimizer = True  # a fresh optimiser per experience, over the grown head

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        return nca(out, batch.y, state.model.head.scale * self.margin, self.nca_form)

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor):
        teacher = self._teacher(state)
        if teacher is None:
            return None
        model_stages = stage_modules(state.model.backbone, "PODNet")
        teacher_stages = stage_modules(teacher.backbone, "PODNet")
        new = [self.tap[m] for m in model_stages]
        h = self.tap[state.model.backbone]
        with torch.no_grad():
            h_old = teacher.backbone(x)
        old = [self.tap[m] for m in teacher_stages]
        spatial = self.spatial_weight * self.factor * pod_spatial(old, new)
        return spatial + self.flat_weight * self.factor * pod_flat(h_old, h)

    def after_backward(self, state: RunState) -> None:
        if self.grad_clip is None:
            return
        for p in state.model.parameters():
            if p.grad is not None:
                p.grad.clamp_(-self.grad_clip, self.grad_clip)

    def post_update(self, state: RunState, exp: Experience) -> None:
        offer(self.buffer, state, exp)
        head: CosineClassifier = state.model.head
        if self.finetune and head.n_old > 0 and self.finetune_epochs > 0:

            def loss(x: Tensor, batch: Experience) -> Tensor:
                out = head(state.model.backbone(x))
                return nca(out, batch.y, head.scale.detach() * self.margin, self.nca_form)

            train_params(
                state,
                self.buffer.samples(),
                [head.old_weight, head.new_weight],
                loss,
                self.finetune_epochs,
                self.finetune_lr,
                self.generator,
                weight_decay=self.finetune_wd,
            )
        self.class_means, self.has_mean = exemplar_means(state, self.buffer)
        self._watch(self.teacher.take(state.model))

    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        if self.classifier == "cnn" or self.class_means is None:
            return state.model(x, t)
        return nearest_mean_logits(state.model.backbone(x), self.class_means, self.has_mean)

    def _teacher(self, state: RunState):
        teacher = self.teacher.get(state.model)
        if self.teacher.rebuilt:  # after a resume: tap the rebuilt copy's stages
            self._watch(teacher)
        return teacher

    def _watch(self, teacher: torch.nn.Module) -> None:
        self.tap.watch([*stage_modules(teacher.backbone, "PODNet"), teacher.backbone])

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "factor": self.factor,
            "class_means": self.class_means,
            "has_mean": self.has_mean,
            "teacher": self.teacher.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.factor = float(state["factor"])
        self.class_means, self.has_mean = state["class_means"], state["has_mean"]
        self.teacher.load_state_dict(state["teacher"])
