"""Heads and dynamic modules: what turns a backbone's features into logits, and how it grows.

Every model is a :class:`CLModel` (backbone → features → head) whose ``forward(x, t)`` returns
logits over the benchmark's whole label space, shape (B, n_classes), whatever the head. Units a
head does not (yet) have are filled with ``MASKED`` so that softmax gives them ~0 probability and
argmax never picks them.

Heads (``model.head``):

- ``single``: one linear layer over all classes.
- ``incremental``: :class:`IncrementalClassifier`, grows a unit for every unseen class when an
  experience arrives; trained weights are kept.
- ``multi``: :class:`MultiHeadClassifier`, one head per task label; each sample of a mixed-task
  batch is routed to its task's head (all heads are computed and gathered: no host sync).

Growth happens in :func:`adapt_model`, which the runner calls before training on an experience:
every submodule with an ``adaptation(experience)`` method is adapted, nested ones included. The
runner then rebuilds the optimiser so that new parameters are trained; :func:`old_part` indexes
the part of a grown parameter that existed before (for penalties on old weights).
:func:`with_head` / :func:`as_multitask` turn any backbone+classifier module into a
:class:`CLModel`.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from clrun.benchmarks import Experience
from clrun.checks import one_of, require

# Backbones a strategy replaces by a grown module while it trains: the module's extra state says
# ``{"grown": kind}``, and GROWN[kind] names the function that grows a freshly built CLModel the
# same way (weights follow), so that a checkpoint taken mid-experience loads into it.
GROWN = {"foster": "clrun.strategies.foster:grow_like_checkpoint"}

MASKED = -1e4  # logit of a unit a head does not have; finite so KL/CE stay finite
HEADS = ("single", "incremental", "multi")


def old_part(shape: torch.Size) -> tuple[slice, ...]:
    """Index of the part of a (possibly grown) parameter that had ``shape``."""
    return tuple(slice(0, s) for s in shape)


class _Units(nn.Module):
    """A linear layer whose output units stand for given global classes (grows on demand)."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        with warnings.catch_warnings():  # an empty head: nothing to initialise yet
            warnings.simplefilter("ignore", UserWarning)
            self.linear = nn.Linear(in_features, 0)
        self.register_buffer("classes", torch.zeros(0, dtype=torch.long))

    def grow(self, classes: Sequence[int]) -> bool:
        new = sorted(set(classes) - set(self.classes.tolist()))
        if not new:
            return False
        old = self.linear
        dev = old.weight.device
        linear = nn.Linear(self.in_features, old.out_features + len(new)).to(dev)
        with torch.no_grad():
            linear.weight[: old.out_features] = old.weight
            linear.bias[: old.out_features] = old.bias
        self.linear = linear
        self.classes = torch.cat([self.classes, torch.tensor(new, device=dev)])
        return True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of a grown head loads into a fresh one: take the saved size first. The
        # layer is made uninitialised (meta, then empty): its values are loaded right after, and
        # an initialisation would draw from the global RNG (a teacher loaded lazily mid-run would
        # then change the initialisation of every unit grown later).
        weight = state_dict.get(prefix + "linear.weight")
        if weight is not None and weight.shape != self.linear.weight.shape:
            dev = self.linear.weight.device
            shape = (self.in_features, weight.shape[0])
            self.linear = nn.Linear(*shape, device="meta").to_empty(device=dev)
            self.classes = torch.zeros(weight.shape[0], dtype=torch.long, device=dev)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: Tensor, n_classes: int) -> Tensor:
        out = features.new_full((features.shape[0], n_classes), MASKED)
        return out.index_copy(1, self.classes, self.linear(features))


class SingleHead(nn.Module):
    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.linear = nn.Linear(in_features, n_classes)

    def forward(self, features: Tensor, t: Tensor | None = None) -> Tensor:
        return self.linear(features)

    def forward_heads(self, features: Tensor) -> Tensor:
        return self.linear(features).unsqueeze(0)


class IncrementalClassifier(nn.Module):
    """A single head that gets a new output unit for every class it has not seen yet."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.n_classes = n_classes
        self.units = _Units(in_features)

    def adaptation(self, experience: Experience) -> bool:
        return self.units.grow(experience.classes)

    def forward(self, features: Tensor, t: Tensor | None = None) -> Tensor:
        return self.units(features, self.n_classes)

    def forward_heads(self, features: Tensor) -> Tensor:
        return self.forward(features).unsqueeze(0)


class MultiHeadClassifier(nn.Module):
    """One incremental head per task label. A sample whose task has no head yet (a future task
    at evaluation) gets all-masked logits."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.in_features, self.n_classes = in_features, n_classes
        self.heads = nn.ModuleList()
        self.register_buffer("task_to_head", torch.zeros(0, dtype=torch.long))

    def adaptation(self, experience: Experience) -> bool:
        grew = False
        for task, classes in experience.classes_by_task.items():
            if task >= len(self.task_to_head):
                pad = torch.full((task + 1 - len(self.task_to_head),), -1, dtype=torch.long)
                self.task_to_head = torch.cat([self.task_to_head, pad.to(self.task_to_head.device)])
            if self.task_to_head[task] < 0:
                head = _Units(self.in_features).to(self.task_to_head.device)
                self.heads.append(head)
                self.task_to_head[task] = len(self.heads) - 1
            grew |= self.heads[int(self.task_to_head[task])].grow(classes)
        return grew

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Create the heads a checkpoint has before loading their weights.
        table = state_dict.get(prefix + "task_to_head")
        if table is not None:
            self.task_to_head = torch.zeros_like(table).to(self.task_to_head.device)
            n_saved = int(table.max()) + 1 if len(table) else 0
            while len(self.heads) < n_saved:
                self.heads.append(_Units(self.in_features).to(self.task_to_head.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward_heads(self, features: Tensor) -> Tensor:
        """(n_heads, B, n_classes): every head on every sample."""
        return torch.stack([h(features, self.n_classes) for h in self.heads])

    def forward(self, features: Tensor, t: Tensor | None = None) -> Tensor:
        if t is None:
            raise ValueError("a multi-head model needs task labels: use benchmark.scenario=task")
        n = len(self.heads)
        masked = features.new_full((1, features.shape[0], self.n_classes), MASKED)
        all_heads = torch.cat([self.forward_heads(features), masked]) if n else masked
        # task label → head index; unknown tasks → the all-masked slot n
        table = torch.cat([self.task_to_head, self.task_to_head.new_full((1,), -1)])
        head = table[t.clamp(max=len(table) - 1)]
        head = torch.where(head < 0, n, head)
        return all_heads[head, torch.arange(features.shape[0], device=features.device)]


def make_head(kind: str, in_features: int, n_classes: int) -> nn.Module:
    require("model.head", kind, one_of(HEADS))
    if kind == "single":
        return SingleHead(in_features, n_classes)
    if kind == "incremental":
        return IncrementalClassifier(in_features, n_classes)
    return MultiHeadClassifier(in_features, n_classes)


class CLModel(nn.Module):
    """backbone → features → head. ``forward(x, t)`` gives global logits (B, n_classes);
    ``forward_heads(x)`` gives every head's logits (n_heads, B, n_classes)."""

    input_spec = None  # the InputSpec of a pre-trained backbone (timm); None: the benchmark's

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        if getattr(self.backbone, "task_conditioned", False):  # PNN columns, HAT gates
            return self.head(self.backbone(x, t), t)
        return self.head(self.backbone(x), t)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Parameter-efficient modules a strategy attached during the run (clrun.models.peft)
        # are re-attached from their saved description before their weights load; a
        # task-conditioned backbone a strategy put in place (clrun.models.task_nets), a backbone a
        # strategy expanded (Dynamic DER, MEMO: clrun.models.expandable), a cosine head that
        # replaced the head from config (LUCIR, PODNet: clrun.models.cosine) and a backbone a
        # strategy grew (GROWN) are rebuilt into their saved shape the same way.
        from clrun.models import cosine, expandable, peft, task_nets

        peft.restore(self, state_dict, prefix)
        task_nets.restore(self, state_dict, prefix)
        expandable.restore(self, state_dict, prefix)
        cosine.restore_head(self, state_dict, prefix)
        extra = state_dict.get(prefix + "backbone._extra_state")
        kind = extra.get("grown") if isinstance(extra, dict) else None
        if kind in GROWN and getattr(self.backbone, "grown", None) != kind:
            module, name = GROWN[kind].split(":")
            with torch.random.fork_rng(devices=[]):  # its initial values are overwritten
                getattr(importlib.import_module(module), name)(self)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward_heads(self, x: Tensor) -> Tensor:
        return self.head.forward_heads(self.backbone(x))


def adapt_model(model: nn.Module, experience: Experience) -> bool:
    """Adapt every dynamic submodule (nested ones too) to an experience. True if it grew."""
    grew = False
    for module in list(model.modules()):
        if hasattr(module, "adaptation"):
            grew |= bool(module.adaptation(experience))
    return grew


# --------------------------------------------------------------------------- any module + our head


def _find_classifier(module: nn.Module, name: str | None) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute, layer) of the classifier: the submodule called ``name`` (dotted
    path), else the last ``nn.Linear`` registered anywhere in ``module`` (found recursively)."""
    if name is None:
        found = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        if not found:
            raise ValueError(
                f"{type(module).__name__} has no nn.Linear classifier to replace; name the "
                "classifier submodule explicitly (classifier=...)"
            )
        name = found[-1]
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    layer = getattr(parent, attr, None)
    if not isinstance(layer, nn.Linear):
        raise ValueError(f"{name!r} of {type(module).__name__} is not an nn.Linear classifier")
    return parent, attr, layer


def with_head(
    module: nn.Module,
    n_classes: int | None = None,
    head: str = "multi",
    classifier: str | None = None,
) -> CLModel:
    """Any backbone+classifier module as a :class:`CLModel` with one of our heads.

    The final ``nn.Linear`` (found recursively: the last one registered, or the submodule named
    ``classifier``, e.g. ``"fc"`` or ``"classifier.1"``) is replaced in place by ``nn.Identity``,
    so the module returns its features; the head (``single``, ``incremental`` or ``multi``) is
    built for the classifier's input width and ``n_classes`` outputs (default: its old output
    width) and put on top, as Avalanche's ``as_multitask`` does. The classifier must be the
    module's last operation, as in torchvision's classification models. The module's other
    weights are kept; ``adapt_model`` then finds the head (and any other dynamic module,
    however deeply nested)."""
    parent, attr, layer = _find_classifier(module, classifier)
    setattr(parent, attr, nn.Identity())
    n = layer.out_features if n_classes is None else n_classes
    new_head = make_head(head, layer.in_features, n)
    return CLModel(module, new_head.to(layer.weight.device))


def as_multitask(
    module: nn.Module, n_classes: int | None = None, classifier: str | None = None
) -> CLModel:
    """:func:`with_head` with a :class:`MultiHeadClassifier`: one head per task label."""
    return with_head(module, n_classes, "multi", classifier)
