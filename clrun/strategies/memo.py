"""MEMO: Memory-efficient Expandable MOdel (Zhou, Wang, Ye & Zhan, "A Model or 603 Exemplars:
Towards Memory-Efficient Class-Incremental Learning", ICLR 2023).

Dynamic DER (:mod:`clrun.strategies.dynamic_der`) with a cheaper expansion: the backbone is split
into generalised (shallow) blocks, shared by every experience, and specialised (deep) blocks, of
which each experience gets its own set; the classifier sees the specialised blocks' features
concatenated. The split is the backbone's ``memo_split()`` (defined for the ResNets of
:mod:`clrun.models.backbones`: the stem and every stage but the last are generalised, the last
stage and the pooling specialised, PyCIL's convs/memo_cifar_resnet.py for ResNet-32 and
convs/memo_resnet.py for ResNet-18); other models are refused in one line.

Hooks as Dynamic DER's (``train_data``: experience + exemplars of the run's ``buffer``;
``pre_update``: a new specialised block set initialised from the newest one, the older ones
frozen in eval mode, the classifier's new columns, the auxiliary classifier with n_new + 1
outputs; ``loss``: cross-entropy + ``aux_weight`` × the auxiliary cross-entropy;
``post_update``: the classifier correction, the auxiliary classifier dropped, the buffer
updated). What differs:

- the generalised blocks are trained with the first experience and frozen from the second on
  (no gradient, eval mode: the paper's "shared generalized blocks"); ``train_generalized: true``
  keeps training them in every experience instead, which the authors' CIFAR-100 command
  (``--train_base``, README of wangkiw/ICLR23-MEMO) and PyCIL's exps/memo.json
  (``"train_base": true``) do;
- the classifier correction defaults to ``weight_align``: the authors' code (models/memo.py of
  wangkiw/ICLR23-MEMO, ``self._network.weight_align(...)`` after each incremental task) scales
  the new classes' weight rows to the mean norm of the old ones; it has no class-balanced
  re-training stage (``correction: retrain`` runs Dynamic DER's).

The grown classifier keeps the old weights in place (``reuse_old_classifier: true``: the
authors' ``AdaptiveNet.update_fc`` copies them). Defaults: λ_a = 1 (``alpha_aux`` of PyCIL's
exps/memo.json). Class-incremental only.

The training regime matters (measured on Split MNIST, conf/strategy/README.md): weight aligning
removes a bias towards the new classes that lies in the norms of their weight rows, which is what
the authors' schedule leaves (SGD, lr 0.1, momentum 0.9, weight decay 2e-4, 170 epochs per task:
PyCIL's exps/memo.json). After a short run with Adam the new rows are smaller than the old ones
(aligning scales them up), the bias lies in their direction, and every old experience ends at 0
accuracy: Dynamic DER with ``correction: weight_align`` does the same, and a class-balanced
re-trained classifier on the same features does not. Train MEMO with the authors' optimiser for
several epochs, or use ``correction: retrain`` with ``reuse_old_classifier: false``.
"""

from __future__ import annotations

from clrun.buffers import Buffer
from clrun.checks import boolean, require
from clrun.components import RunState
from clrun.errors import ConfigError
from clrun.models.expandable import ExpandedBackbone
from clrun.strategies.dynamic_der import DynamicDER


class MEMO(DynamicDER):
    kind = "memo"
    name = "MEMO"

    def __init__(
        self,
        buffer: Buffer | None,
        aux_weight: float = 1.0,
        train_generalized: bool = False,
        correction: str = "weight_align",
        retrain_epochs: int = 50,
        retrain_lr: float = 0.05,
        retrain_milestones: list[int] | tuple[int, ...] = (15, 30),
        retrain_lr_decay: float = 0.1,
        retrain_weight_decay: float = 5e-4,
        temperature: float = 5.0,
        reuse_old_classifier: bool = True,
        seed: int = 0,
    ):
        super().__init__(
            buffer,
            aux_weight,
            correction,
            retrain_epochs,
            retrain_lr,
            retrain_milestones,
            retrain_lr_decay,
            retrain_weight_decay,
            temperature,
            reuse_old_classifier,
            seed,
        )
        self.train_generalized = require("strategy train_generalized", train_generalized, boolean())

    def check(self, state: RunState) -> None:
        super().check(state)
        backbone = state.model.backbone
        if not isinstance(backbone, ExpandedBackbone) and not hasattr(backbone, "memo_split"):
            raise ConfigError(
                f"MEMO splits the backbone into generalised and specialised blocks, defined for "
                f"the ResNets (model=resnet32 | resnet18 | resnet18_reduced), not for a "
                f"{type(backbone).__name__} backbone"
            )

    def after_branch(self, backbone: ExpandedBackbone) -> None:
        backbone.freeze(backbone.n_frozen, shared=not self.train_generalized)
