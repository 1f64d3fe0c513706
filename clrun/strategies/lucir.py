"""LUCIR: Learning a Unified Classifier Incrementally via Rebalancing (Hou, Pan, Loy, Wang & Lin,
CVPR 2019).

The model's head becomes a cosine normaliser (:class:`~clrun.models.CosineClassifier`, one
weight per class): logits σ·cos(f, θ_c) with a learnable σ. Exemplars come from the run's
buffer (``buffer=herding`` by the strategy's YAML: a class-balanced buffer whose classes keep
the samples herding picks on the L2-normalised features, the paper's; ``buffer.max_per_group=20``
with ``buffer.max_size=2000`` is the paper's 20 per class).

- ``train_data``: the experience's samples together with every exemplar in the buffer.
- ``pre_update``: the first time, the cosine head replaces the model's head. New classes get a
  weight each: from the second experience on, imprinted (the authors' ``--imprint_weights``:
  the normalised mean of the class's normalised features, times the mean norm of the old
  classes' weights); the classes learnt so far become old and their weights fixed (the code's
  learning rate 0 for ``fc1``; σ keeps training). The less-forget weight is set,
  λ = λ_base·√(old classes / new classes) (``adaptive_lambda``; else λ_base). A fresh optimiser
  (the code builds one per phase).
- ``penalty`` (from the second experience on), added to the runner's cross-entropy on σ·cos:
  the less-forget constraint λ·mean(1 − cos(f(x), f*(x))) between the features of the model and
  of the model as it was before this experience (eval mode); and the margin ranking loss: for
  every sample of an old class, its unscaled cosine to its own class against its K
  highest cosines among the new classes, ``mr_weight``·mean(max(0, m − cos_y + cos_k)).
- ``post_update``: the buffer takes the experience (herding on the current features); the
  class means of the exemplars' normalised features are computed (for ``classifier=nme``);
  with ``finetune=true``, class-balanced finetuning (CBF): only the class weights (old and new;
  σ and the backbone fixed, batch norm in eval mode) are trained on the exemplars alone
  (balanced: every class has the same share) with cross-entropy and the margin ranking loss,
  SGD (momentum 0.9) for ``finetune_epochs`` at ``finetune_lr``, times 0.1 at each of
  ``finetune_milestones`` (the authors' ``cbf_class_incremental_cosine_cifar100.py``,
  ``--ft_flag 2``; its less-forget term has no gradient there). The model becomes the next
  experience's teacher.
- ``predict``: ``classifier=cnn`` the cosine head's logits (the paper's "CNN"), ``nme`` the
  nearest mean of exemplars (iCaRL's rule, the paper's "NME").

Where the paper is silent, the authors' code (hshustc/CVPR19_Incremental_Learning,
``cifar100-class-incremental/class_incremental_cosine_cifar100.py``,
``utils_incremental/incremental_train_and_eval_MR_LF.py``, ``modified_linear.py``): first-phase
weights U(±1/√d) and σ = 1; the ranking negatives are the new classes' top-K scores; the mean
of the ranking loss over the old-class samples × K pairs. Not included: the code's ResNet-32
without the last block's ReLU (ours keeps the model from config), its class means averaged with
horizontally flipped copies. Class-incremental only (``benchmark.scenario=class``, a single or
incremental head); the buffer must be class-balanced by class.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience, concat
from clrun.buffers import ClassBalancedBuffer
from clrun.checks import boolean, int_at_least, number_above, number_at_least, one_of, require
from clrun.components import RunState
from clrun.errors import ConfigError
from clrun.models.cosine import CosineClassifier, use_cosine_head
from clrun.strategies.utils import (
    FeatureTap,
    Teacher,
    backbone_features,
    nearest_mean_logits,
    offer,
    require_class_il,
    train_params,
)

__all__ = ["LUCIR", "margin_ranking", "check_exemplar_setting", "exemplar_means"]

CLASSIFIERS = ("cnn", "nme")


def margin_ranking(sims: Tensor, units: Tensor, n_old: int, k: int, margin: float) -> Tensor:
    """LUCIR's margin ranking loss. ``sims``: (B, n_units) unscaled class similarities, old
    classes' units first (``n_old``); ``units``: each sample's unit. For each sample of an old
    class, its similarity to its class against its ``k`` highest similarities among the new
    classes: the mean over those pairs of max(0, margin − s_y + s_k); 0 without such samples."""
    old = units < n_old
    k = min(k, sims.shape[1] - n_old)
    if k <= 0 or not bool(old.any()):
        return sims.new_zeros(())
    pos = sims[old].gather(1, units[old].unsqueeze(1))  # (h, 1)
    hard = sims[old, n_old:].topk(k, dim=1).values  # (h, k)
    return F.relu(margin - pos + hard).mean()


def check_exemplar_setting(state: RunState, buffer, what: str) -> None:
    """Class-incremental, offline, with a class-balanced buffer grouped by class."""
    why_offline = "selects exemplars from all the data of an experience at its end"
    require_class_il(what, state, why_offline, one_head=False)
    if not isinstance(buffer, ClassBalancedBuffer) or buffer.groupby != "class":
        kind = type(buffer).__name__ if buffer is not None else "none"
        raise ConfigError(
            f"{what} keeps exemplars per class: buffer={kind} is not supported; use "
            "buffer=herding (or buffer=class_balanced buffer.groupby=class)"
        )


def exemplar_means(state: RunState, buffer) -> tuple[Tensor, Tensor]:
    """(class means of the exemplars' normalised backbone features, normalised; which classes
    have exemplars): the nearest-mean-of-exemplars classifier."""
    exemplars = buffer.samples()
    f = backbone_features(state)(exemplars)
    n = state.benchmark.n_classes
    means = torch.zeros(n, f.shape[1], device=f.device).index_add_(0, exemplars.y, f)
    counts = torch.bincount(exemplars.y, minlength=n)
    return F.normalize(means / counts.clamp(min=1).unsqueeze(1), dim=1), counts > 0


def class_features(state: RunState, exp: Experience, classes: list[int]) -> list[Tensor]:
    """Each class's normalised backbone features over the experience's samples of it."""
    features = backbone_features(state)
    return [features(exp.subset(torch.nonzero(exp.y == c).squeeze(1))) for c in classes]


def unit_of(head: CosineClassifier, y: Tensor) -> Tensor:
    """Each target's unit in the head (its position in ``head.classes``)."""
    pos = torch.full((head.n_classes,), -1, dtype=torch.long, device=y.device)
    pos[head.classes] = torch.arange(len(head.classes), device=y.device)
    return pos[y]


class LUCIR:
    def __init__(
        self,
        buffer=None,
        lambda_base: float = 5.0,
        adaptive_lambda: bool = True,
        margin: float = 0.5,
        hard_negatives: int = 2,
        mr_weight: float = 1.0,
        imprint: bool = True,
        classifier: str = "cnn",
        finetune: bool = False,
        finetune_epochs: int = 20,
        finetune_lr: float = 0.01,
        finetune_milestones: list[int] | tuple[int, ...] = (10,),
        finetune_weight_decay: float = 5e-4,
        seed: int = 0,
    ):
        require("strategy.lambda_base", lambda_base, number_at_least(0))
        require("strategy.adaptive_lambda", adaptive_lambda, boolean())
        require("strategy.margin", margin, number_at_least(0))
        require("strategy.hard_negatives", hard_negatives, int_at_least(1))
        require("strategy.mr_weight", mr_weight, number_at_least(0))
        require("strategy.imprint", imprint, boolean())
        require("strategy.classifier", classifier, one_of(CLASSIFIERS))
        require("strategy.finetune", finetune, boolean())
        require("strategy.finetune_epochs", finetune_epochs, int_at_least(0))
        require("strategy.finetune_lr", finetune_lr, number_above(0))
        require("strategy.finetune_weight_decay", finetune_weight_decay, number_at_least(0))
        self.buffer = buffer
        self.lambda_base, self.adaptive_lambda = float(lambda_base), adaptive_lambda
        self.margin, self.k, self.mr_weight = float(margin), hard_negatives, float(mr_weight)
        self.imprint, self.classifier = imprint, classifier
        self.finetune, self.finetune_epochs = finetune, finetune_epochs
        self.finetune_lr, self.finetune_wd = float(finetune_lr), float(finetune_weight_decay)
        self.finetune_milestones = [int(m) for m in finetune_milestones]
        self.generator = torch.Generator().manual_seed(seed)  # the finetuning's order
        self.lam = 0.0  # the current experience's less-forget weight
        self.class_means: Tensor | None = None
        self.has_mean: Tensor | None = None
        self.teacher = Teacher()
        self.tap = FeatureTap()  # the backbone's output in the runner's forward pass

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        check_exemplar_setting(state, self.buffer, "LUCIR")
        self.tap.watch([state.model.backbone])
        if len(self.buffer) == 0:
            return exp
        return concat([exp, self.buffer.samples()], exp.index)

    def pre_update(self, state: RunState, exp: Experience) -> None:
        use_cosine_head(state.model, 1, "LUCIR", last_relu=False)
        head = state.model.head
        new = [c for c in exp.classes if c not in set(head.classes.tolist())]
        weights = None
        if self.imprint and len(head.classes) and new:
            with torch.no_grad():
                norm = head.weight.norm(dim=1).mean()  # all classes so far become old
                means = torch.stack([f.mean(0) for f in class_features(state, exp, new)])
                weights = F.normalize(means, dim=1) * norm
        head.grow(new, weights, init="uniform")
        n_old = head.n_old
        ratio = n_old / max(len(new), 1)
        self.lam = self.lambda_base * (math.sqrt(ratio) if self.adaptive_lambda else 1.0)
        state.reset_optimizer = True  # a fresh optimiser per experience, over the grown head

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor):
        teacher = self.teacher.get(state.model)
        if teacher is None:
            return None
        head = state.model.head
        f = self.tap[state.model.backbone].flatten(1)  # the features of the runner's forward
        with torch.no_grad():
            f_old = teacher.backbone(x).flatten(1)
        lf = (1 - F.cosine_similarity(f, f_old, dim=1)).mean()
        return self.lam * lf + self.mr_weight * self._ranking(head, f, batch.y)

    def _ranking(self, head: CosineClassifier, f: Tensor, y: Tensor) -> Tensor:
        units = unit_of(head, y)
        return margin_ranking(head.similarities(f), units, head.n_old, self.k, self.margin)

    def post_update(self, state: RunState, exp: Experience) -> None:
        offer(self.buffer, state, exp)
        self.class_means, self.has_mean = exemplar_means(state, self.buffer)
        head = state.model.head
        if self.finetune and head.n_old > 0 and self.finetune_epochs > 0:

            def loss(x: Tensor, batch: Experience) -> Tensor:
                f = state.model.backbone(x)
                ce = F.cross_entropy(head(f), batch.y)
                return ce + self.mr_weight * self._ranking(head, f, batch.y)

            train_params(
                state,
                self.buffer.samples(),
                [head.old_weight, head.new_weight],
                loss,
                self.finetune_epochs,
                self.finetune_lr,
                self.generator,
                weight_decay=self.finetune_wd,
                milestones=self.finetune_milestones,
            )
        self.teacher.take(state.model)

    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        if self.classifier == "cnn" or self.class_means is None:
            return state.model(x, t)
        return nearest_mean_logits(state.model.backbone(x), self.class_means, self.has_mean)

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "lam": self.lam,
            "class_means": self.class_means,
            "has_mean": self.has_mean,
            "teacher": self.teacher.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.lam = float(state["lam"])
        self.class_means, self.has_mean = state["class_means"], state["has_mean"]
        self.teacher.load_state_dict(state["teacher"])
