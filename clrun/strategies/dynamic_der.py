"""Dynamic DER: Dynamically Expandable Representation (Yan, Xie & He, CVPR 2021). The option is
``dynamic_der``, not to be confused with Buzzega et al.'s Dark Experience Replay (``der``).

At each experience a new feature extractor, a copy of the configured backbone, is added beside
the frozen old ones; the classifier sees their features concatenated (the "super-feature"). An
auxiliary classifier over the new extractor's features alone (the new classes + one unit for all
old ones) pushes it to learn what is new. Exemplars: the run's ``buffer`` (the paper's: herding,
2000 on CIFAR-100: ``buffer=herding buffer.max_size=2000``).

- ``train_data``: the experience's samples together with the buffer's (PyCIL's DER and the
  paper: new data + exemplars).
- ``pre_update`` (grows the model, sanctioned): at the first experience the model becomes an
  expandable one (:mod:`clrun.models.expandable`: the backbone is the first extractor, the head an
  :class:`~clrun.models.expandable.ExpandedClassifier`); later, a new extractor initialised from
  the newest one (PyCIL's ``DERNet.update_fc`` loads the previous extractor's state dict) is
  appended, every older one frozen (no gradient, eval mode: BatchNorm statistics fixed, PyCIL's
  ``DER.train``), the classifier gains the new feature columns and an auxiliary classifier with
  ``n_new + 1`` outputs is attached. The grown classifier is freshly initialised
  (``reuse_old_classifier: false``, the authors' configuration ``reuse_oldfc: False``: the
  previous one was re-trained with a temperature, its logits are on another scale), or keeps
  the old weights in place with fresh new columns (``true``: PyCIL's ``update_fc``). The optimiser is rebuilt fresh (PyCIL builds a new SGD per task).
- ``loss`` (replaces the runner's cross-entropy): cross-entropy over the seen classes +
  ``aux_weight`` (λ_a) × cross-entropy of the auxiliary classifier, whose target is 0 for an old
  class and 1 + i for the i-th new class (PyCIL: ``loss_clf + loss_aux``, λ_a = 1).
- ``post_update``, from the second experience on, the classifier learning stage (``correction``):
  ``retrain`` (default, the paper's §3.2): the classifier is re-initialised and re-trained alone,
  the extractors frozen in eval mode, on a class-balanced subset of the experience's training
  data (its samples and the exemplars, every class cut at random to the size of the smallest:
  the authors' undersampling), with the run's batch size and augmentation, its own SGD
  (momentum 0.9) for ``retrain_epochs`` epochs at ``retrain_lr`` times ``retrain_lr_decay`` at
  each of ``retrain_milestones``, weight decay ``retrain_weight_decay``, logits divided by
  ``temperature``; ``weight_align``: PyCIL's replacement (``weight_align``: new-class weight rows
  scaled to the mean norm of the old ones); ``none``. Then the auxiliary classifier is dropped
  (the inference model is what ``params`` counts) and the experience is offered to the buffer
  (herding on the concatenated features). Draws use a generator seeded by (seed, experience).

Not included: the paper's channel-level masks and pruning (sparsity loss, annealed masks). The
authors' released code does not implement them ("masking and pruning are not implemented by the
source repo": the first line of PyCIL's models/der.py), so there is no option for them.

The retraining settings (50 epochs, lr 0.05 decayed × 0.1 at epochs 15 and 30, weight decay 5e-4,
temperature 5, the classifier reset first, a class-balanced subset of new data + memory, then the
memory update) are the authors' code's ``decouple`` stage (Rhyssiyan/DER-ClassIL.pytorch at dd4af61,
codes/base/configs/1.yaml; the fork FarmerJohnLYH/DER-CIL-pytorch-Reproduction keeps them in
configs/B0S10.yaml; inclearn/models/incmodel.py resets the classifier and builds the
"balanced_train" loader unless ``fullset``).

Class-incremental only (``benchmark.scenario=class``, not online); heads single or incremental
(both become the expandable classifier). State: the classes seen before the
current experience (the model holds the rest; the runner checkpoints the buffer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrun.benchmarks import Experience, concat
from clrun.buffers import Buffer
from clrun.checks import boolean, int_at_least, number_above, number_at_least, one_of, require
from clrun.components import RunState
from clrun.errors import ConfigError
from clrun.models.expandable import ExpandedBackbone, expand
from clrun.strategies.utils import class_balanced_subset, offer, require_class_il

CORRECTIONS = ("retrain", "weight_align", "none")


class DynamicDER:
    kind = "der"
    name = "Dynamic DER"

    def __init__(
        self,
        buffer: Buffer | None,
        aux_weight: float = 1.0,
        correction: str = "retrain",
        retrain_epochs: int = 50,
        retrain_lr: float = 0.05,
        retrain_milestones: list[int] | tuple[int, ...] = (15, 30),
        retrain_lr_decay: float = 0.1,
        retrain_weight_decay: float = 5e-4,
        temperature: float = 5.0,
        reuse_old_classifier: bool = False,
        seed: int = 0,
    ):
        if buffer is None:
            raise ConfigError(
                f"{self.name} keeps exemplars in the run's buffer: buffer=none is not supported; "
                "choose buffer=herding (the paper's) or buffer=class_balanced / reservoir"
            )
        self.buffer, self.seed = buffer, int(seed)
        self.aux_weight = require("strategy aux_weight", aux_weight, number_at_least(0))
        self.correction = require("strategy correction", correction, one_of(CORRECTIONS))
        self.retrain_epochs = require("strategy retrain_epochs", retrain_epochs, int_at_least(1))
        self.retrain_lr = require("strategy retrain_lr", retrain_lr, number_above(0))
        self.retrain_milestones = [int(m) for m in retrain_milestones]
        self.retrain_lr_decay = require(
            "strategy retrain_lr_decay", retrain_lr_decay, number_above(0)
        )
        self.retrain_weight_decay = require(
            "strategy retrain_weight_decay", retrain_weight_decay, number_at_least(0)
        )
        self.temperature = require("strategy temperature", temperature, number_above(0))
        self.reuse_old_classifier = require(
            "strategy reuse_old_classifier", reuse_old_classifier, boolean()
        )
        self.old_classes: list[int] = []  # classes of the experiences before the current one

    # ------------------------------------------------------------------ hooks

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        self.check(state)
        if len(self.buffer) == 0:
            return exp
        return concat([exp, self.buffer.samples()], exp.index)

    def pre_update(self, state: RunState, exp: Experience) -> None:
        model = state.model
        if not isinstance(model.backbone, ExpandedBackbone):
            expand(model, self.kind)
        else:
            model.backbone.add_branch()
            self.after_branch(model.backbone)
            model.head.grow_features(model.backbone.branch_features, self.reuse_old_classifier)
        new = sorted(c for c in set(exp.classes) if c not in self.old_classes)
        if self.old_classes and new:
            model.head.set_aux(model.backbone.branch_features, new)
        state.reset_optimizer = True  # a fresh optimiser over the grown model, as PyCIL per task

    def after_branch(self, backbone: ExpandedBackbone) -> None:
        """What else freezes once a branch is added (MEMO: the generalised blocks)."""

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        loss = F.cross_entropy(out, batch.y)
        head = state.model.head
        aux, head.aux_logits = head.aux_logits, None
        if aux is not None and self.aux_weight > 0:
            loss = loss + self.aux_weight * F.cross_entropy(aux, head.aux_target[batch.y])
        return loss

    def post_update(self, state: RunState, exp: Experience) -> None:
        head = state.model.head
        if self.old_classes:
            if self.correction == "retrain":
                data = exp
                if len(self.buffer):
                    data = concat([exp, self.buffer.samples()], exp.index)
                self.retrain_classifier(state, data)
            elif self.correction == "weight_align":
                n_new = len(set(exp.classes) - set(self.old_classes))
                weight_align(head.fc.weight, n_new)
        head.drop_aux()
        self.old_classes = sorted(set(self.old_classes) | set(exp.classes))
        offer(self.buffer, state, exp)

    # ------------------------------------------------------------------ the classifier stage

    def retrain_classifier(self, state: RunState, data: Experience) -> None:
        """Re-initialise the classifier and train it alone on a class-balanced subset of
        ``data``, the extractors frozen in eval mode (the paper's classifier learning stage)."""
        model, head = state.model, state.model.head
        gen = torch.Generator().manual_seed(self.seed * 100_003 + state.experience)
        samples = data.subset(class_balanced_subset(data.y, gen))
        fc: nn.Linear = head.fc
        with torch.no_grad():  # nn.Linear's own initialisation, from the seeded generator
            nn.init.kaiming_uniform_(fc.weight, a=5**0.5, generator=gen)
            bound = 1 / fc.in_features**0.5
            nn.init.uniform_(fc.bias, -bound, bound, generator=gen)
        optimizer = torch.optim.SGD(
            fc.parameters(),
            lr=self.retrain_lr,
            momentum=0.9,
            weight_decay=self.retrain_weight_decay,
        )
        was_training = model.training
        model.eval()
        bs, n = state.batch_size, len(samples)
        for epoch in range(self.retrain_epochs):
            decays = sum(epoch >= m for m in self.retrain_milestones)
            for group in optimizer.param_groups:
                group["lr"] = self.retrain_lr * self.retrain_lr_decay**decays
            order = torch.randperm(n, generator=gen).to(samples.y.device)
            for i in range(0, n, bs):
                b = samples.subset(order[i : i + bs])
                x = state.model_input(b.x, b.e, train=True)
                with torch.no_grad(), state.autocast():
                    features = model.backbone(x)
                with state.autocast():
                    logits = head(features.float())
                    loss = F.cross_entropy(logits.float() / self.temperature, b.y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        model.train(was_training)

    # ------------------------------------------------------------------ checks, state

    def check(self, state: RunState) -> None:
        require_class_il(self.name, state, "grows the model once per experience")

    def state_dict(self) -> dict:
        return {"old_classes": list(self.old_classes)}

    def load_state_dict(self, state: dict) -> None:
        self.old_classes = list(state["old_classes"])


@torch.no_grad()
def weight_align(weight: Tensor, n_new: int) -> None:
    """Weight aligning (Zhao et al., CVPR 2020), as PyCIL's ``weight_align`` does it: the last
    ``n_new`` rows (the new classes) scaled by mean ‖old row‖ / mean ‖new row‖; biases untouched."""
    if n_new <= 0 or n_new >= weight.shape[0]:
        return
    old, new = weight[:-n_new].norm(dim=1).mean(), weight[-n_new:].norm(dim=1).mean()
    weight[-n_new:] *= old / new
