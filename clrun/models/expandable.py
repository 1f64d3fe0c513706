"""Expandable models: a backbone that gains a feature extractor (or a block set) per experience,
and the classifier over the concatenation of their features (Dynamic DER, MEMO).

A strategy (:mod:`clrun.strategies.dynamic_der`, :mod:`clrun.strategies.memo`) turns a
:class:`~clrun.models.CLModel` into an expandable one in ``pre_update`` (:func:`expand`), then
adds a branch per experience (:meth:`ExpandedBackbone.add_branch`):

- :class:`ExpandedBackbone`: ``shared`` (MEMO's generalised blocks; ``nn.Identity`` for DER)
  followed by ``branches``, one per experience (DER: a whole copy of the backbone; MEMO: the
  specialised blocks); features = the branches' features concatenated in order. The first
  ``n_frozen`` branches (and ``shared`` when ``shared_frozen``) take no gradient and stay in eval
  mode whatever ``train()`` says, so their BatchNorm statistics never change either.
- :class:`ExpandedClassifier`: one linear layer over the concatenated features whose output
  units stand for the classes seen so far (others get ``MASKED``); it grows columns when a
  branch is added and rows for unseen classes (``adaptation``, which the runner calls). While an
  auxiliary classifier ``aux`` is attached (over the newest branch's features, the new classes +
  one "old" unit), a training forward pass leaves its logits in ``aux_logits`` for the loss.

Resume: both modules describe their shape in their extra state; :func:`restore`, which
``CLModel._load_from_state_dict`` calls, rebuilds a freshly built model into the saved shape
before the weights load (values drawn meanwhile are overwritten and do not touch the global
random state).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from clrun.models.heads import MASKED

KINDS = ("der", "memo")


def new_linear(in_features: int, out_features: int) -> nn.Linear:
    """PyCIL's ``SimpleLinear`` initialisation (utils/inc_net.py, the classifier of its DER and
    MEMO): weights Kaiming-uniform for a linear layer, bias 0."""
    with warnings.catch_warnings():  # an empty layer: nothing to initialise yet
        warnings.simplefilter("ignore", UserWarning)
        layer = nn.Linear(in_features, out_features)
        with torch.no_grad():
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="linear")
            layer.bias.zero_()
    return layer


class ExpandedBackbone(nn.Module):
    def __init__(self, kind: str, shared: nn.Module, first: nn.Module, branch_features: int):
        super().__init__()
        self.kind = kind
        self.shared = shared
        self.branches = nn.ModuleList([first])
        self.branch_features = branch_features  # features of one branch (d)
        self.n_frozen = 0
        self.shared_frozen = False

    @property
    def out_features(self) -> int:
        return self.branch_features * len(self.branches)

    def add_branch(self) -> None:
        """A new branch initialised from the newest one (DER and MEMO in PyCIL: the new extractor
        loads the previous one's state dict); every older branch is frozen."""
        self.branches.append(copy.deepcopy(self.branches[-1]))
        self.freeze(len(self.branches) - 1, self.shared_frozen)

    def freeze(self, n_branches: int, shared: bool) -> None:
        """Freeze the first ``n_branches`` branches (and ``shared``): no gradient, eval mode."""
        self.n_frozen, self.shared_frozen = n_branches, shared
        for i, b in enumerate(self.branches):
            b.requires_grad_(i >= n_branches)
        self.shared.requires_grad_(not shared)
        self.train(self.training)

    def train(self, mode: bool = True) -> ExpandedBackbone:
        super().train(mode)
        for b in self.branches[: self.n_frozen]:
            b.eval()
        if self.shared_frozen:
            self.shared.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        base = self.shared(x)
        return torch.cat([b(base).flatten(1) for b in self.branches], 1)

    def get_extra_state(self) -> dict:
        return {
            "kind": self.kind,
            "n_branches": len(self.branches),
            "n_frozen": self.n_frozen,
            "shared_frozen": self.shared_frozen,
            "branch_features": self.branch_features,
        }

    def set_extra_state(self, state: dict) -> None:
        self.freeze(int(state["n_frozen"]), bool(state["shared_frozen"]))


class ExpandedClassifier(nn.Module):
    """Linear units for the classes seen so far over the concatenated features, and an optional
    auxiliary classifier over the newest branch's features."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.fc = new_linear(in_features, 0)
        self.register_buffer("classes", torch.zeros(0, dtype=torch.long))
        self.aux: nn.Linear | None = None
        self.register_buffer("aux_target", torch.zeros(0, dtype=torch.long))
        self.aux_logits: Tensor | None = None  # left by a training forward pass for the loss

    def grow_features(self, extra: int, reuse: bool = True) -> None:
        """``extra`` more input features (a new branch). ``reuse``: the old weights keep their
        place (PyCIL's ``update_fc``: ``fc.weight[:old, :old_dim] = weight``), the new columns
        are freshly initialised for every unit; else the whole layer is freshly initialised
        (the DER authors' ``reuse_oldfc: False``)."""
        old = self.fc
        layer = new_linear(old.in_features + extra, old.out_features).to(old.weight.device)
        if reuse:
            with torch.no_grad():
                layer.weight[:, : old.in_features] = old.weight
                layer.bias.copy_(old.bias)
        self.fc = layer

    def adaptation(self, experience) -> bool:
        """A unit for every class of the experience not seen yet (the runner calls it)."""
        new = sorted(set(experience.classes) - set(self.classes.tolist()))
        if not new:
            return False
        old = self.fc
        dev = old.weight.device
        layer = new_linear(old.in_features, old.out_features + len(new)).to(dev)
        with torch.no_grad():
            layer.weight[: old.out_features] = old.weight
            layer.bias[: old.out_features] = old.bias
        self.fc = layer
        self.classes = torch.cat([self.classes, torch.tensor(new, device=dev)])
        return True

    def set_aux(self, features: int, new_classes: list[int]) -> None:
        """An auxiliary classifier over the newest ``features``: unit 0 for every old class, unit
        1 + i for the i-th new class (PyCIL's ``aux_fc``, ``new_task_size + 1`` outputs)."""
        dev = self.classes.device
        self.aux = new_linear(features, len(new_classes) + 1).to(dev)
        target = torch.zeros(self.n_classes, dtype=torch.long, device=dev)
        target[torch.tensor(new_classes, device=dev)] = torch.arange(1, len(new_classes) + 1).to(
            dev
        )
        self.aux_target = target

    def drop_aux(self) -> None:
        self.aux, self.aux_logits = None, None
        self.aux_target = self.aux_target[:0]

    def forward(self, features: Tensor, t: Tensor | None = None) -> Tensor:
        if self.training and self.aux is not None:
            self.aux_logits = self.aux(features[:, -self.aux.in_features :])
        out = features.new_full((features.shape[0], self.n_classes), MASKED)
        return out.index_copy(1, self.classes, self.fc(features).to(out.dtype))

    def forward_heads(self, features: Tensor) -> Tensor:
        return self.forward(features).unsqueeze(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a grown classifier (and an attached auxiliary one) loads into a fresh one: take the
        # saved shapes first; the values are loaded right after
        with torch.random.fork_rng(devices=[]):
            dev = self.classes.device
            weight = state_dict.get(prefix + "fc.weight")
            if weight is not None and weight.shape != self.fc.weight.shape:
                self.fc = nn.Linear(weight.shape[1], weight.shape[0]).to(dev)
                self.classes = torch.zeros(weight.shape[0], dtype=torch.long, device=dev)
            aux = state_dict.get(prefix + "aux.weight")
            if aux is None:
                self.drop_aux()
            elif self.aux is None or aux.shape != self.aux.weight.shape:
                self.aux = nn.Linear(aux.shape[1], aux.shape[0]).to(dev)
                self.aux_target = torch.zeros(self.n_classes, dtype=torch.long, device=dev)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def head_features(head: nn.Module) -> int:
    """The input width of one of our heads (single or incremental)."""
    for layer in (
        getattr(head, "linear", None),
        getattr(getattr(head, "units", None), "linear", None),
    ):
        if isinstance(layer, nn.Linear):
            return layer.in_features
    raise ValueError(f"cannot read the feature width of a {type(head).__name__} head")


def expand(model: nn.Module, kind: str) -> None:
    """Turn ``model`` (a :class:`~clrun.models.CLModel` built from config) into an expandable
    one with one branch: DER's branch is the whole backbone; MEMO's, the specialised blocks of
    the backbone's ``memo_split()`` (generalised blocks shared). The head becomes an
    :class:`ExpandedClassifier` without units (the runner grows them)."""
    backbone = model.backbone
    if kind == "der":
        d = head_features(model.head)
        model.backbone = ExpandedBackbone(kind, nn.Identity(), backbone, d)
    else:
        shared, specialised = backbone.memo_split()
        model.backbone = ExpandedBackbone(kind, shared, specialised, backbone.out_features)
    n_classes = model.head.n_classes if hasattr(model.head, "n_classes") else None
    if n_classes is None:
        n_classes = model.head.linear.out_features
    model.head = ExpandedClassifier(model.backbone.out_features, n_classes).to(
        next(model.parameters()).device
    )


def restore(model: nn.Module, state_dict: dict, prefix: str) -> None:
    """Rebuild a freshly built model into the expanded shape a saved state dict describes
    (``backbone._extra_state``), before its weights load."""
    extra = state_dict.get(prefix + "backbone._extra_state")
    if not isinstance(extra, dict) or extra.get("kind") not in KINDS:
        return
    with torch.random.fork_rng(devices=[]):
        if not isinstance(model.backbone, ExpandedBackbone):
            expand(model, extra["kind"])
        backbone = model.backbone
        while len(backbone.branches) < int(extra["n_branches"]):
            backbone.add_branch()
        extra_columns = backbone.out_features - model.head.fc.in_features
        if extra_columns > 0:
            model.head.grow_features(extra_columns)
    # the freezing comes with the backbone's own extra state (set_extra_state)


__all__ = [
    "KINDS",
    "ExpandedBackbone",
    "ExpandedClassifier",
    "expand",
    "new_linear",
    "restore",
]
