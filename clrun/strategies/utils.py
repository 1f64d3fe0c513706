"""Public helpers for components; import them from your own package
(``from clrun.strategies.utils import quadratic, sum_per_sample_grads``).

What several strategies share, in one place, so that a component of your own gets the same
semantics (grown heads, eval mode, batching, seeded augmentation) as the built-in ones:

- grown tensors: :func:`old_part` (from :mod:`clrun.models`) slices the part of a parameter that
  existed before an incremental head grew;
- quadratic penalties Σ w (θ − θ*)² (EWC, SI, MAS, RWalk): :func:`anchor_of`, :func:`quadratic`,
  and :func:`add_quadratic_grad` for components that add the penalty's gradient themselves after
  reading the loss's own gradient (SI, RWalk);
- gradients as one vector (GEM, A-GEM): :func:`flat_grad`, :func:`write_grad`;
- sums over samples of a function of per-sample gradients (EWC's Fisher, MAS's importance):
  :func:`sum_per_sample_grads`;
- from raw samples to the model (replay methods, iCaRL, X-DER, GEM): :func:`piece`,
  :func:`model_input` (the runner's "raw batch → model input"), :func:`backbone_features`
  (penultimate features), :func:`buffer_features` and :func:`offer` (a buffer update with the
  features a ranked selection needs), :func:`frozen_copy` (a teacher), and
  :func:`nearest_mean_logits` (a nearest-class-mean classifier);
- embeddings of a frozen backbone, computed once per (samples, backbone weights) and shared by
  every component: :func:`frozen_features` (from :mod:`clrun.features`);
- :func:`strong_augment`, X-DER's SimCLR-style augmentation as batched tensor operations;
- :func:`class_balanced_subset`: every class cut at random to the size of the smallest
  (undersampling: Dynamic DER's classifier learning stage).
- intermediate features: :func:`stage_modules` (what a backbone's "stages" are) and
  :class:`FeatureTap` (their latest outputs, through forward hooks); :func:`train_params`, a
  short training of chosen parameters on given samples (class-balanced finetuning).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from clrun import distributed
from clrun.benchmarks import Experience
from clrun.buffers import Buffer, FeatureFn
from clrun.components import RunState
from clrun.features import frozen_features
from clrun.models import MASKED, old_part
from clrun.strategies.augment import strong_augment

__all__ = [
    "FeatureTap",
    "Teacher",
    "add_quadratic_grad",
    "anchor_of",
    "backbone_features",
    "buffer_features",
    "class_balanced_subset",
    "flat_grad",
    "frozen_copy",
    "freeze_other_heads",
    "frozen_features",
    "model_input",
    "nearest_mean_logits",
    "offer",
    "old_part",
    "piece",
    "quadratic",
    "require_class_il",
    "require_task_il",
    "soft_cross_entropy",
    "strong_augment",
    "sum_per_sample_grads",
    "with_memory",
    "stage_modules",
    "train_params",
    "write_grad",
]

# ------------------------------------------------------------------ quadratic penalties
# A parameter that grew since its anchor θ* was taken (an incremental head got new units) is
# penalised on its old part only; parameters created later have no weight and no penalty.


def anchor_of(model: nn.Module) -> dict[str, Tensor]:
    """θ*: a detached copy of every parameter of the model as it is now."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def quadratic(model: nn.Module, weights: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """Σ over the model's parameters of weights · (θ − anchor)², summed in float32 (also under
    bf16 autocast). Differentiable; call it under ``no_grad`` for the value alone."""
    device = next(iter(weights.values())).device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for name, p in model.named_parameters():
        w = weights.get(name)
        if w is not None:
            part = p if p.shape == w.shape else p[old_part(w.shape)]  # no slice op when not grown
            total = total + (w * (part - anchor[name]).pow(2)).sum()
    return total


@torch.no_grad()
def add_quadratic_grad(
    params: Iterable[tuple[str, Tensor]],
    weights: dict[str, Tensor],
    anchor: dict[str, Tensor],
    coef: float,
) -> None:
    """``p.grad`` += the gradient of (``coef`` / 2) · Σ w (θ − θ*)², i.e. ``coef`` · w (θ − θ*),
    on each parameter's old part, for the named parameters that have a weight (a missing
    ``p.grad`` starts at zero). For penalties whose value is returned without a graph, so that
    ``backward`` leaves the rest of the loss's gradient in ``p.grad`` to be read first."""
    for name, p in params:
        w = weights.get(name)
        if w is None:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        old = old_part(w.shape)
        p.grad[old] += coef * w * (p[old] - anchor[name])


# ------------------------------------------------------------------ gradients as one vector


def flat_grad(grads: list[Tensor | None], params: list[Tensor]) -> Tensor:
    """One vector of all gradients (zeros for None)."""
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def write_grad(flat: Tensor, params: list[Tensor], used: list[bool]) -> None:
    """Set ``p.grad`` from ``flat`` for the parameters marked ``used`` (those with a gradient in
    the loss or in the memory loss; the others keep ``p.grad`` None, so the optimiser skips them)."""
    offset = 0
    for p, keep in zip(params, used, strict=True):
        part = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if not keep:
            continue
        if p.grad is None:
            p.grad = part.clone()
        else:
            p.grad.copy_(part)


# ------------------------------------------------------------------ per-sample gradients
# Two exact ways to compute Σ_i reduce(g_i):
# - models whose trainable parameters all belong to ``nn.Linear`` layers (the MLPs, with any
#   head): the per-sample gradient of a weight is the outer product δ_i a_iᵀ of the layer's
#   output gradient and input, so Σ_i (δ_i a_iᵀ)² = (δ²)ᵀ(a²) and Σ_i |δ_i a_iᵀ| = |δ|ᵀ|a|: one
#   backward pass per batch, no per-sample gradient is ever materialised (~50× faster on an MLP);
# - any other model: ``torch.func.vmap`` over ``grad``.


def sum_per_sample_grads(
    state: RunState,
    samples: Experience,
    loss: Callable[[Tensor, Tensor], Tensor],
    reduce: Callable[[Tensor], Tensor],
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Σ_i reduce(∂ loss(f(x_i), y_i) / ∂θ) for every trainable parameter θ, with the model in
    eval mode (dropout off, batch-norm running statistics): the diagonal Fisher of EWC
    (``reduce=torch.square``), the importance of MAS (``torch.abs``). ``loss(out, y)`` returns
    one loss per sample; ``reduce`` is elementwise. The optimiser's ``p.grad`` is left as it was.
    """
    model = state.model
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = None

    def add_linear(x: Tensor, b: Experience, sums: dict) -> None:
        _add_linear(model, params, sums, x, b, loss, reduce)

    if reduce in (torch.square, torch.abs) and _all_linear(model, params):
        try:
            sums = _sums(state, samples, 4096, add_linear, params)
        except _NotFlat:  # a Linear saw inputs with extra dimensions: use the general way
            sums = None
    if sums is None:
        per_sample = _vmapped(model, params, loss)
        detached = {k: p.detach() for k, p in params.items()}

        def add(x: Tensor, b: Experience, sums: dict) -> None:
            for k, g in per_sample(detached, x, b.y, b.t).items():
                sums[k] += reduce(g).sum(0)

        sums = _sums(state, samples, batch_size, add, params)
    model.train(was_training)
    return sums


def _sums(state: RunState, samples: Experience, step: int, add: Callable, params: dict) -> dict:
    """In a distributed run each process sums its shard of the samples, then the sums are
    added up (:func:`clrun.distributed.sum_sharded`)."""

    def compute(part: range) -> dict:
        sums = {k: torch.zeros_like(v) for k, v in params.items()}
        for i in range(part.start, part.stop, step):
            idx = torch.arange(i, min(i + step, part.stop), device=samples.y.device)
            b = samples.subset(idx)
            add(state.model_input(b.x, b.e), b, sums)
        return sums

    return distributed.sum_sharded(len(samples), compute)


class _NotFlat(Exception):
    pass


def _all_linear(model: nn.Module, params: dict[str, Tensor]) -> bool:
    owned = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    return all(id(p) in owned for p in params.values())


def _vmapped(model: nn.Module, params: dict[str, Tensor], loss: Callable) -> Callable:
    buffers = dict(model.named_buffers())

    def sample_loss(p: dict, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0), t.unsqueeze(0)))
        return loss(out, y.unsqueeze(0)).sum()

    return vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))


def _add_linear(model, params, sums, x, b, loss, reduce) -> None:
    """One forward/backward of the summed per-sample losses; hooks collect each Linear's input
    a (B, in) and output gradient δ (B, out), exact because samples do not interact in eval."""
    names = {id(p): n for n, p in params.items()}
    inputs: dict[nn.Linear, Tensor] = {}
    grads: dict[nn.Linear, Tensor] = {}
    handles = []

    def capture(m: nn.Module, args: tuple, out: Tensor) -> None:
        inputs[m] = args[0].detach()
        out.register_hook(lambda g: grads.__setitem__(m, g.detach()))

    for m in model.modules():
        if isinstance(m, nn.Linear) and any(id(p) in names for p in m.parameters()):
            handles.append(m.register_forward_hook(capture))
    saved = {k: p.grad for k, p in params.items()}  # the optimiser's, left as they were
    try:
        for p in params.values():
            p.grad = None
        with torch.enable_grad():
            loss(model(x, b.t), b.y).sum().backward(inputs=list(params.values()))
    finally:
        for h in handles:
            h.remove()
    for k, p in params.items():
        p.grad = saved[k]
    for m, a in inputs.items():
        d = grads.get(m)
        if d is None or a.dim() != 2:
            raise _NotFlat
        sums[names[id(m.weight)]] += reduce(d).T @ reduce(a)
        if m.bias is not None and id(m.bias) in names:
            sums[names[id(m.bias)]] += reduce(d).sum(0)


# ------------------------------------------------------------------ raw samples → the model


def piece(samples: Experience, start: int, stop: int) -> Experience:
    """Samples ``start:stop`` (a view, no copy)."""
    s = slice(start, stop)
    return Experience(samples.index, samples.x[s], samples.y[s], samples.t[s], samples.e[s])


def model_input(state: RunState, samples: Experience, train: bool = False) -> Tensor:
    """Raw samples (an :class:`Experience`) → the model's input, as the runner prepares a
    minibatch (:meth:`clrun.components.RunState.model_input`)."""
    return state.model_input(samples.x, samples.e, train=train)


def backbone_features(state: RunState, batch_size: int = 256) -> FeatureFn:
    """A feature function for buffer selection and nearest-mean classifiers: raw samples →
    L2-normalised features of ``state.model.backbone`` (the penultimate layer; eval mode, no
    gradient, batched), as iCaRL computes them. In a distributed run each process computes its
    shard and gets all rows (:func:`clrun.distributed.cat_sharded`)."""

    def shard(samples: Experience, part: range) -> Tensor:
        model = state.model
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(part.start, part.stop, batch_size):
                x = model_input(state, piece(samples, i, min(i + batch_size, part.stop)))
                out.append(F.normalize(model.backbone(x).flatten(1).float(), dim=1))
        model.train(was_training)
        return torch.cat(out)

    def features(samples: Experience) -> Tensor:
        return distributed.cat_sharded(len(samples), lambda part: shard(samples, part))

    return features


def buffer_features(buffer: Buffer, state: RunState) -> FeatureFn | None:
    """The feature function a buffer's selection needs, or None."""
    return backbone_features(state) if getattr(buffer, "needs_features", False) else None


def offer(buffer: Buffer, state: RunState, samples: Experience, **extra: Tensor) -> None:
    """Offer ``samples`` (with ``extra`` per-sample fields, e.g. DER's logits) to ``buffer``,
    passing the backbone features when its selection ranks samples by them (a buffer class of
    the user's own that does not rank need not take ``features``)."""
    features = buffer_features(buffer, state)
    if features is None:
        buffer.update(samples, **extra)
    else:
        buffer.update(samples, features=features, **extra)


def frozen_copy(model: nn.Module, weights: dict | None = None) -> nn.Module:
    """A deep copy of ``model`` (with ``weights`` loaded, if given) in eval mode and without
    gradients: a distillation teacher (LwF, iCaRL)."""
    teacher = copy.deepcopy(model)
    if weights is not None:
        teacher.load_state_dict(weights)
    return teacher.eval().requires_grad_(False)


def nearest_mean_logits(features: Tensor, means: Tensor, has_mean: Tensor) -> Tensor:
    """Logits of the nearest-mean classifier: minus the squared distance of the L2-normalised
    features to each (normalised) class mean; classes without a mean get MASKED."""
    f = F.normalize(features.flatten(1).float(), dim=1)
    dist = torch.cdist(f, means.float()).pow(2)
    return (-dist).masked_fill(~has_mean, MASKED)


# ------------------------------------------------------------------ exemplar-memory class-IL
# BiC, WA and FOSTER train on the experience together with every exemplar of the run's buffer
# (PyCIL's ``appendent=self._get_memory()``) and distil the old model with a soft cross-entropy.


def require_class_il(
    method: str,
    state: RunState,
    why_offline: str = "trains on whole experiences with their exemplars",
    one_head: bool = True,
) -> None:
    """A one-line ConfigError unless the run is class-incremental and offline (the method
    ``why_offline``) and, with ``one_head``, has a single or incremental head (the methods that
    rebalance old and new classes' logits)."""
    from clrun.errors import ConfigError
    from clrun.models import MultiHeadClassifier

    scenario = state.benchmark.scenario
    if scenario != "class":
        raise ConfigError(
            f"{method} is class-incremental only: benchmark.scenario={scenario} is not "
            "supported; use benchmark.scenario=class"
        )
    if getattr(state.benchmark, "train_origin", None) is not None:
        raise ConfigError(f"{method} {why_offline}: benchmark.online=true is not supported")
    if one_head and isinstance(getattr(state.model, "head", None), MultiHeadClassifier):
        raise ConfigError(
            f"{method} needs one head over all classes: model.head=multi is not supported; use "
            "model.head=incremental or single"
        )


def with_memory(buffer: Buffer, exp: Experience) -> Experience:
    """The experience's samples followed by every sample of ``buffer`` (none while it is empty)."""
    from clrun.benchmarks import concat

    return concat([exp, buffer.samples()], exp.index) if len(buffer) else exp


def soft_cross_entropy(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """−Σ_k softmax(teacher/T)_k · log softmax(student/T)_k, averaged over the samples: the
    distillation loss of BiC, WA and FOSTER (PyCIL's ``_KD_loss``; no T² factor)."""
    target = F.softmax(teacher.float() / temperature, dim=1)
    return -(target * F.log_softmax(student.float() / temperature, dim=1)).sum(1).mean()


# ------------------------------------------------------------------ task-incremental only methods


def require_task_il(state: RunState, method: str) -> None:
    """A one-line ConfigError unless the run is task-incremental with a multi-head model (the
    architecture methods keep one column, mask or gate set per task label)."""
    from clrun.errors import ConfigError
    from clrun.models import MultiHeadClassifier

    scenario = state.benchmark.scenario
    if scenario != "task" or not isinstance(
        getattr(state.model, "head", None), MultiHeadClassifier
    ):
        what = f"benchmark.scenario={scenario}" if scenario != "task" else "a single head"
        raise ConfigError(
            f"{method} is task-incremental only: {what} is not supported; use "
            "benchmark.scenario=task model.head=multi"
        )


def freeze_other_heads(model: nn.Module, tasks: Iterable[int]) -> None:
    """Heads of a multi-head model for task labels not in ``tasks`` get no gradients (with a
    stateful optimiser, an old head's zero gradient would still move it: momentum, Adam)."""
    head = model.head
    keep = {int(head.task_to_head[t]) for t in tasks if t < len(head.task_to_head)}
    for i, h in enumerate(head.heads):
        h.requires_grad_(i in keep)


# ------------------------------------------------------------------ class balance


def class_balanced_subset(y: Tensor, generator: torch.Generator) -> Tensor:
    """Indices of a class-balanced subset of labels ``y``: every class present cut to the count
    of the smallest, by a random draw from ``generator`` (undersampling). Sorted by class."""
    classes, counts = y.unique(return_counts=True)
    m = int(counts.min())
    picked = []
    for c in classes.tolist():
        idx = torch.nonzero(y == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=generator)[:m].to(idx.device)])
    return torch.cat(picked)


# ------------------------------------------------------------------ intermediate features


def stage_modules(backbone: nn.Module, what: str) -> list[nn.Module]:
    """The modules whose outputs are the backbone's stages, first to last: the CIFAR ResNets'
    stages of residual blocks (``model=resnet18/resnet18_reduced/resnet32``); the ``cnn``'s
    conv stages (each ends in its max-pool); the ``mlp``'s hidden layers (each ends in its
    activation, before any dropout: a hidden layer of width d is a d-channel 1×1 map). Any other backbone: a one-line error."""
    from clrun.errors import ConfigError
    from clrun.models import ResNet

    if isinstance(backbone, ResNet):
        return list(backbone.stages)
    if isinstance(backbone, nn.Sequential):
        layers = list(backbone)
        if layers and isinstance(layers[0], nn.Flatten):  # mlp: what precedes the next Linear
            linear = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
            ends = [i - 1 for i in linear[1:]] + [len(layers) - 1] if linear else []
            stages = []
            for end in ends:
                while isinstance(layers[end], nn.Dropout):
                    end -= 1
                stages.append(layers[end])
        else:  # cnn
            stages = [m for m in layers if isinstance(m, nn.MaxPool2d)]
        if stages:
            return stages
    raise ConfigError(
        f"{what} distils the outputs of the backbone's stages: {type(backbone).__name__} has none "
        "it knows; use model=mlp, cnn, resnet32, resnet18 or resnet18_reduced"
    )


class FeatureTap:
    """The latest output of chosen submodules, kept by forward hooks (per module, weakly: a
    module that goes keeps nothing alive). A deep copy of a hooked model (a teacher) keeps
    hooks into this same tap, each writing under its own module."""

    def __init__(self):
        self.outputs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def watch(self, modules: Iterable[nn.Module]) -> None:
        for m in modules:
            if not any(getattr(h, "__self__", None) is self for h in m._forward_hooks.values()):
                m.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: tuple, out) -> None:
        self.outputs[module] = out

    def __getitem__(self, module: nn.Module):
        return self.outputs[module]

    def __deepcopy__(self, memo: dict) -> FeatureTap:
        return self  # a copied model's hooks write here, under the copy's modules


def train_params(
    state: RunState,
    samples: Experience,
    params: list[nn.Parameter],
    loss: Callable[[Tensor, Experience], Tensor],
    epochs: int,
    lr: float,
    generator: torch.Generator,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    milestones: Iterable[int] = (),
    gamma: float = 0.1,
) -> None:
    """Train only ``params`` on ``samples`` for ``epochs`` passes of ``state.batch_size`` in an
    order drawn from ``generator``, with SGD of its own (``lr`` times ``gamma`` at each milestone
    epoch), batch norm in eval mode (its statistics stay as they are): the class-balanced
    finetuning of LUCIR and PODNet. ``loss(x, batch)`` gets the prepared (augmented) input. The
    parameters' ``requires_grad`` and the optimiser's gradients are left as they were."""
    model, n, bs = state.model, len(samples), state.batch_size
    was_training, grads_on = model.training, [p.requires_grad for p in params]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = set(milestones)
    for epoch in range(epochs):
        if epoch in steps:
            for g in opt.param_groups:
                g["lr"] *= gamma
        order = torch.randperm(n, generator=generator).to(samples.y.device)
        for i in range(0, n, bs):
            batch = samples.subset(order[i : i + bs])
            x = state.model_input(batch.x, batch.e, train=True)
            with state.autocast():
                value = loss(x, batch)
            for p, g in zip(params, torch.autograd.grad(value, params), strict=True):
                p.grad = g
            opt.step()
    for p, on in zip(params, grads_on, strict=True):
        p.grad = None
        p.requires_grad_(on)
    model.train(was_training)


# ------------------------------------------------------------------ a distillation teacher


class Teacher:
    """A frozen copy of the model that a component distils from (BiC, WA, LUCIR, PODNet), saved
    with the component. ``take(model)`` copies the model; after a resume the copy is rebuilt from
    its saved weights on the first ``get(model)`` (the model then has its grown shape), and
    ``rebuilt`` says that this call rebuilt it (for hooks to re-register)."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self._saved: dict | None = None  # loaded from a checkpoint, built on first use
        self.rebuilt = False

    def take(self, model: nn.Module) -> nn.Module:
        self.model, self._saved = frozen_copy(model), None
        return self.model

    def get(self, model: nn.Module) -> nn.Module | None:
        self.rebuilt = self._saved is not None
        if self.rebuilt:
            self.model, self._saved = frozen_copy(model, self._saved), None
        return self.model

    def state_dict(self) -> dict | None:
        return self.model.state_dict() if self.model is not None else self._saved

    def load_state_dict(self, saved: dict | None) -> None:
        self.model, self._saved = None, saved
