"""Cosine classifiers that strategies put on a model: LUCIR's cosine normaliser and PODNet's
local similarity classifier (LSC), one class, :class:`CosineClassifier`.

A unit is a class; each class has ``proxies`` weight vectors (1: LUCIR; K > 1: PODNet's LSC).
For features h and proxies θ_{c,k} (both L2-normalised), s_{c,k} = cos(h, θ_{c,k}) (or, with
``similarity=neg_squared_distance``, −‖ĥ − θ̂‖² = 2·cos − 2, PODNet's code); the class
similarity is ŷ_c = Σ_k softmax_k(s_{c,·}) s_{c,k} (with one proxy, ŷ_c = s_c), and the logit is
``scale`` · ŷ_c, ``scale`` a learned scalar (LUCIR's σ, PODNet's η), initialised to 1. Classes
the head does not have get ``MASKED`` logits, as every head of :mod:`clrun.models.heads`.

Old and new classes. The weights are two parameters: ``old_weight`` (the classes of earlier
experiences, ``requires_grad=False``: both papers' code fixes them while training on a new
experience, LUCIR with learning rate 0 for ``fc1``, PODNet with ``groupwise_factors.old_weights:
0``) and ``new_weight`` (the classes being learnt). :meth:`grow` moves the new ones to the old
ones and appends the new classes' weights (random, or given: imprinted).

Both methods' code takes the features before the backbone's last ReLU (:func:`drop_last_relu`),
so that cosines can be negative.

Resume and growth. The head describes itself in its extra state (kind, proxies, similarity,
whether the last ReLU is out); a
:class:`~clrun.models.CLModel` whose checkpoint holds such a head builds one in place of the head
from config before loading (:func:`restore_head`), and the head takes the saved sizes first, so a
fresh model loads a grown checkpoint.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clrun.errors import ConfigError
from clrun.models.heads import MASKED, IncrementalClassifier, MultiHeadClassifier, SingleHead

KIND = "cosine"
INITS = ("uniform", "normal")


class CosineClassifier(nn.Module):
    """Cosine (``proxies=1``) or local-similarity (``proxies`` > 1) classifier over the classes it
    has grown; ``forward(features, t)`` gives (B, n_classes) logits."""

    def __init__(
        self, in_features: int, n_classes: int, proxies: int = 1, similarity: str = "cosine"
    ):
        super().__init__()
        self.in_features, self.n_classes, self.proxies = in_features, n_classes, proxies
        self.similarity = similarity  # cosine | neg_squared_distance (−‖ĥ − θ̂‖² = 2·cos − 2)
        self.last_relu = True  # False: the backbone's final ReLU was taken out (drop_last_relu)
        self.old_weight = nn.Parameter(torch.zeros(0, in_features), requires_grad=False)
        self.new_weight = nn.Parameter(torch.zeros(0, in_features))
        self.scale = nn.Parameter(torch.ones(()))  # σ (LUCIR) / η (PODNet)
        self.register_buffer("classes", torch.zeros(0, dtype=torch.long))  # unit → class

    @property
    def weight(self) -> Tensor:
        """All proxies, (n_units · proxies, d): old classes first."""
        return torch.cat([self.old_weight, self.new_weight])

    @property
    def n_old(self) -> int:
        """Units (classes) of earlier experiences: the first ``n_old`` units."""
        return self.old_weight.shape[0] // self.proxies

    def grow(self, classes: Sequence[int], weights: Tensor | None = None, init: str = "uniform"):
        """The current new classes become old (fixed); ``classes`` (those not yet here) get
        proxies: ``weights`` (len(new) · proxies, d) if given, else random (``uniform``: U(±1/√d),
        LUCIR's CosineLinear; ``normal``: N(0, 1/d), PODNet's Kaiming-normal). Returns whether
        it grew."""
        new = [c for c in classes if c not in set(self.classes.tolist())]
        if not new:
            return False
        dev, d = self.new_weight.device, self.in_features
        if weights is None:
            weights = torch.empty(len(new) * self.proxies, d, device=dev)
            if init == "uniform":
                weights.uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d))
            else:
                weights.normal_(0.0, 1 / math.sqrt(d))
        with torch.no_grad():
            old = torch.cat([self.old_weight, self.new_weight])
        self.old_weight = nn.Parameter(old, requires_grad=False)
        self.new_weight = nn.Parameter(weights.detach().to(dev, old.dtype).clone())
        self.classes = torch.cat([self.classes, torch.tensor(new, device=self.classes.device)])
        return True

    def adaptation(self, experience) -> bool:
        # strategies grow the head in pre_update (with imprinted weights); this covers any other
        # use, with random weights
        return self.grow(experience.classes)

    def similarities(self, features: Tensor) -> Tensor:
        """ŷ, (B, n_units): the class similarities before the scale (LUCIR's "scores before
        scale", in [−1, 1]), units in the head's order (``classes``)."""
        cos = F.linear(F.normalize(features.flatten(1), dim=1), F.normalize(self.weight, dim=1))
        if self.similarity == "neg_squared_distance":
            cos = 2 * cos - 2  # PODNet's code: −‖ĥ − θ̂‖² of the normalised vectors
        per_class = cos.view(cos.shape[0], -1, self.proxies)
        return (F.softmax(per_class, dim=-1) * per_class).sum(-1)

    def forward(self, features: Tensor, t: Tensor | None = None) -> Tensor:
        logits = self.scale * self.similarities(features)
        out = logits.new_full((features.shape[0], self.n_classes), MASKED)
        return out.index_copy(1, self.classes, logits)

    def forward_heads(self, features: Tensor) -> Tensor:
        return self.forward(features).unsqueeze(0)

    def get_extra_state(self) -> dict:
        return {
            "kind": KIND,
            "proxies": self.proxies,
            "last_relu": self.last_relu,
            "similarity": self.similarity,
        }

    def set_extra_state(self, state: dict) -> None:
        self.proxies, self.last_relu = int(state["proxies"]), bool(state["last_relu"])
        self.similarity = str(state["similarity"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # take the saved sizes first (uninitialised: the values are loaded right after, and an
        # initialisation would draw from the global random state)
        dev = self.new_weight.device
        for name, grad in (("old_weight", False), ("new_weight", True)):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                empty = torch.empty(saved.shape, device=dev)
                setattr(self, name, nn.Parameter(empty, requires_grad=grad))
        saved = state_dict.get(prefix + "classes")
        if saved is not None and saved.shape != self.classes.shape:
            self.classes = torch.zeros(saved.shape, dtype=torch.long, device=dev)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def head_in_features(head: nn.Module, what: str) -> int:
    """The feature width a model's head reads (single or incremental head)."""
    if isinstance(head, CosineClassifier):
        return head.in_features
    if isinstance(head, SingleHead):
        return head.linear.in_features
    if isinstance(head, IncrementalClassifier):
        return head.units.in_features
    kind = "multi" if isinstance(head, MultiHeadClassifier) else type(head).__name__
    raise ConfigError(
        f"{what} puts a cosine classifier on the model: model.head={kind} is not supported; use "
        "model.head=single or incremental (one head over all classes)"
    )


def drop_last_relu(backbone: nn.Module, what: str) -> None:
    """Take out the backbone's final ReLU, so that features (and cosines) may be negative: the
    LUCIR authors' ``modified_resnet_cifar.py`` ("remove ReLU in the last layer": the last block
    without it) and PODNet's ``extract_no_act``. CIFAR ResNets: the last block's; ``mlp`` and
    ``cnn`` (``nn.Sequential``): the last ``nn.ReLU`` becomes ``nn.Identity``."""
    from clrun.models.backbones import ResNet

    if isinstance(backbone, ResNet):
        backbone.stages[-1][-1].relu_out = False
        return
    if isinstance(backbone, nn.Sequential):
        relus = [i for i, m in enumerate(backbone) if isinstance(m, nn.ReLU)]
        if relus:
            backbone[relus[-1]] = nn.Identity()
            return
    raise ConfigError(
        f"{what} takes the backbone's features before its last ReLU: {type(backbone).__name__} "
        "is not supported; use model=mlp, cnn, resnet32, resnet18 or resnet18_reduced"
    )


def use_cosine_head(
    model: nn.Module,
    proxies: int,
    what: str,
    last_relu: bool = True,
    similarity: str = "cosine",
) -> bool:
    """Put a :class:`CosineClassifier` with ``proxies`` per class in place of ``model.head``
    (nothing if it has one); without ``last_relu``, the backbone's final ReLU is taken out
    (:func:`drop_last_relu`). Returns whether the head was replaced."""
    head = model.head
    if isinstance(head, CosineClassifier):
        if head.proxies != proxies:
            raise ConfigError(
                f"{what}: the model's cosine head has {head.proxies} proxies per class, the "
                f"strategy asks for {proxies}"
            )
        return False
    n_classes = getattr(head, "n_classes", None) or head.linear.out_features
    dev = next(model.parameters()).device
    new = CosineClassifier(head_in_features(head, what), n_classes, proxies, similarity).to(dev)
    if not last_relu:
        drop_last_relu(model.backbone, what)
        new.last_relu = False
    model.head = new
    return True


def restore_head(model: nn.Module, state_dict: dict, prefix: str) -> None:
    """Before a model loads a state dict: if it holds a cosine head (``head._extra_state`` of
    kind ``cosine``) and the model has another head, put a cosine head in its place (and take
    out the backbone's last ReLU if the saved model had it out)."""
    extra = state_dict.get(prefix + "head._extra_state")
    if not (isinstance(extra, dict) and extra.get("kind") == KIND):
        return
    if isinstance(model.head, CosineClassifier):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        proxies, last_relu = int(extra["proxies"]), bool(extra["last_relu"])
        use_cosine_head(model, proxies, "a saved model", last_relu, str(extra["similarity"]))
