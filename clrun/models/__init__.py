"""Models: a backbone that maps inputs to features, and a classifier head that may grow.

Every model option of ``conf/model/`` is a builder here that returns a :class:`CLModel` whose
``forward(x, t)`` gives logits over the benchmark's whole label space. YAML and code name
everything through this package (``_target_: clrun.models.mlp``,
``from clrun.models import MASKED``), never through the module that defines it.

What lives where:

- ``heads.py``: :class:`CLModel`, the heads (single, :class:`IncrementalClassifier`,
  :class:`MultiHeadClassifier`, ``HEADS``, :func:`make_head`), growth (:func:`adapt_model`,
  :func:`old_part`), and :func:`with_head` / :func:`as_multitask`, which put one of our heads on
  any backbone+classifier module.
- ``backbones.py``: the networks trained from scratch or taken from torchvision: ``mlp``,
  ``cnn``, the CIFAR ResNets (``resnet18_reduced``, ``resnet18``, ``resnet32``),
  ``mobilenet_v1`` and ``torchvision_model``, with their initialisations.

- ``timm.py``: ``timm_model`` (``model=timm``), any timm model as a backbone with weights from
  nowhere, the hub, a file or a clrun run; it reports its input size and normalisation
  (``model.input_spec``), which the runner makes every benchmark fit.

- ``task_nets.py``: task-conditioned backbones that task-incremental strategies put in place of
  a plain ``mlp`` / ``cnn`` one (PNN's :class:`ProgressiveColumns`, HAT's :class:`HATGates`);
  ``CLModel`` passes them the task labels and rebuilds them when a checkpoint holds one.
``cosine.py``: :class:`CosineClassifier`, the cosine / local-similarity head that LUCIR and
PODNet put on a model (it survives resume and growth like the heads above).

Parameter-efficient modules (prompts, adapters, LoRA) that strategies attach to a model go in
``peft.py``; the prompt pools of L2P, DualPrompt and CODA-Prompt in ``prompts.py``, registered
among peft's kinds; the expandable backbone and classifier that Dynamic DER and MEMO grow a model
into (one branch per experience, restored into a fresh model on resume) in ``expandable.py``.
"""

from clrun.models.backbones import (
    MLP_INITS,
    MOBILENET_V1,
    BasicBlock,
    ResNet,
    cnn,
    mlp,
    mobilenet_v1,
    resnet18,
    resnet18_reduced,
    resnet32,
    torchvision_model,
)
from clrun.models.cosine import CosineClassifier
from clrun.models.heads import (
    HEADS,
    MASKED,
    CLModel,
    IncrementalClassifier,
    MultiHeadClassifier,
    SingleHead,
    adapt_model,
    as_multitask,
    make_head,
    old_part,
    with_head,
)
from clrun.models.task_nets import HATGates, ProgressiveColumns
from clrun.models.timm import TimmBackbone, timm_model

__all__ = [
    "HEADS",
    "MASKED",
    "MLP_INITS",
    "MOBILENET_V1",
    "BasicBlock",
    "CLModel",
    "HATGates",
    "CosineClassifier",
    "IncrementalClassifier",
    "MultiHeadClassifier",
    "ProgressiveColumns",
    "ResNet",
    "SingleHead",
    "TimmBackbone",
    "adapt_model",
    "as_multitask",
    "cnn",
    "make_head",
    "mlp",
    "mobilenet_v1",
    "old_part",
    "resnet18",
    "resnet18_reduced",
    "resnet32",
    "timm_model",
    "torchvision_model",
    "with_head",
]
