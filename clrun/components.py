"""The component protocol: what a strategy is made of, and when the runner calls it.

A strategy is an ordered set of components (``strategy.components`` in the YAML). A component is
any object with some of these methods; the runner finds them by name and calls them, in the order
the strategy lists the components, at fixed points of the loop in ``clrun/run.py``:

==================================  ======================================  ======================
hook                                called                                  returns / may change
==================================  ======================================  ======================
``train_data(state, exp)``          before an experience                    the Experience to train
                                                                            on (default: ``exp``)
``pre_update(state, exp)``          before training on an experience        its own state; may reset
                                                                            the model's weights
``replay(state, batch)``            each step, before the forward pass      the raw batch to train on
``loss(state, batch, x, out)``      each step, after the forward pass       the classification loss
                                                                            (default: cross-entropy;
                                                                            at most one component)
``penalty(state, batch, x, out)``   each step, after the forward pass       a loss term (or None)
``after_backward(state)``           between backward and optimiser step     the gradients in place
``after_step(state, batch, x, out)`` after the optimiser step               its own state
``post_update(state, exp)``         after training on an experience         its own state
``predict(state, x, t)``            at evaluation, if present               logits to score (at
                                                                            most one component)
``forget(state, experiences)``      at an unlearning request, after the     what the component
                                    run's buffer lost those experiences'    derived from those
                                    samples                                 experiences
``unlearn(state, experiences)``     at an unlearning request, after         the model: the
                                    ``forget``                              unlearning method
==================================  ======================================  ======================

The ``predict`` provider may also have ``predict_experience(state, exp)`` → logits of every
sample of ``exp`` (raw samples) at once; evaluation then uses it instead of ``predict``. It is
for classifiers on the embeddings of a frozen backbone (SimpleCIL, RanPAC, FeCAM): they take the
embeddings from the frozen-feature cache (:mod:`clrun.features`), so the test stream's are
computed once per run, not after every experience.

``batch`` is an :class:`~clrun.benchmarks.Experience` of raw samples (``x`` in its compact
dtype); ``x`` is the prepared model input and ``out`` the logits. Components never replace the
loop, the data order or the optimiser. The model itself grows (new heads or units) in the runner
right after ``pre_update``; the optimiser is then rebuilt, keeping the state of parameters that
survived. A ``pre_update`` that resets the model sets ``state.reset_optimizer = True`` to get a
fresh optimiser as well; so does a ``post_update`` that replaces the model's parameters (FOSTER's
compression), and the runner rebuilds the optimiser right after ``post_update``, before the
checkpoint.

A run resumed inside an experience calls ``train_data`` again but not ``pre_update``: ``train_data``
must give the same data when called twice, and whatever ``pre_update`` sets up must be in the
component's state.

A component with state implements ``state_dict()`` / ``load_state_dict(state)`` holding tensors
and plain Python values only, so that checkpoints load with ``torch.load(weights_only=True)``.
Its tensors come back on the run's device, except a random generator's state, which the runner
keeps on the CPU if it is under the key ``generator`` (``checkpoint.RNG_KEYS``).
If a component's constructor takes a ``buffer`` (or ``seed``) argument the YAML does not set,
the runner passes the run's buffer (or seed).

Per-parameter learning rates: a component may have an attribute ``lr_scales``, a dict from a
prefix of the model's parameter names to a multiple of ``optimizer.lr`` (SLCA's slow backbone:
``{"backbone.": 0.01}``). Every optimiser the runner builds then has one parameter group per
multiple (the unscaled group first), each with ``lr_scale`` and its rate set; the longest
matching prefix wins. It is fixed when the component is built, so a resumed run rebuilds the
same groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from clrun.benchmarks import Benchmark, Experience
from clrun.errors import ConfigError
from clrun.models import adapt_model, old_part

HOOKS = (
    "train_data",
    "pre_update",
    "replay",
    "loss",
    "penalty",
    "after_backward",
    "after_step",
    "post_update",
    "predict",
    "forget",
    "unlearn",
)


@dataclass
class RunState:
    """What components may read (and, for the model, reset) during a run."""

    model: nn.Module
    benchmark: Benchmark
    device: torch.device
    batch_size: int
    optimizer: torch.optim.Optimizer | None = None
    lr_schedule: object | None = None  # sets the optimiser's rate at each epoch (clrun.schedules)
    experience: int = 0  # index of the experience being trained on
    step: int = 0  # optimiser steps taken so far in the whole run
    reset_optimizer: bool = (
        False  # set in pre_update / post_update: a fresh optimiser (then cleared)
    )
    precision: str = "fp32"  # fp32 | bf16: the forward pass and loss run under autocast
    channels_last: bool = False  # image inputs in channels-last memory format
    buffer: object | None = None  # the run's replay buffer, if a component uses it

    def autocast(self):
        """The context the forward pass and losses run in (bf16 autocast or nothing)."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16")

    def model_input(self, x: torch.Tensor, e: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Raw samples (``x`` in the benchmark's compact dtype, ``e`` their experiences) → the
        model's input: the benchmark's preparation (normalisation, resizing, augmentation with
        ``train``), in the run's memory format. The one way every component feeds the model."""
        x = self.benchmark.prepare(x, e, train=train)
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    extras: dict = field(default_factory=dict)


# Hooks whose value replaces the runner's default: one component at most may provide each.
SINGLE_PROVIDER_HOOKS = ("loss", "predict")


class Components:
    """An ordered, named set of components with their hooks collected once (a component
    without a hook costs nothing in the loop). Two components that both provide ``loss`` (or
    ``predict``) are a config error: one would silently replace the other."""

    def __init__(self, components: dict[str, object]):
        self.items = dict(components)
        self.hooks = {
            h: [getattr(c, h) for c in self.items.values() if callable(getattr(c, h, None))]
            for h in HOOKS
        }
        for hook in SINGLE_PROVIDER_HOOKS:
            names = [n for n, c in self.items.items() if callable(getattr(c, hook, None))]
            if len(names) > 1:
                raise ConfigError(
                    f"strategy.components: {' and '.join(names)} both provide {hook}(); a strategy "
                    f"may have one {hook} provider: remove one of them or combine them in one "
                    "component"
                )

        self.lr_scales: dict[str, float] = {}
        for name, c in self.items.items():
            for key, scale in (getattr(c, "lr_scales", None) or {}).items():
                if self.lr_scales.get(key, scale) != scale:
                    raise ConfigError(
                        f"strategy.components.{name}: asks for learning rate × {scale} on "
                        f"{key}*, another component for × {self.lr_scales[key]}"
                    )
                self.lr_scales[key] = float(scale)

    def optimizer_factory(self, make_optimizer, model: nn.Module):
        """``make_optimizer`` itself, or, if a component has ``lr_scales``, a factory that
        splits the parameters it gets into one group per learning-rate multiple."""
        if not self.lr_scales:
            return make_optimizer
        scales = sorted(self.lr_scales.items(), key=lambda kv: -len(kv[0]))

        def make(params) -> torch.optim.Optimizer:
            names = {id(p): n for n, p in model.named_parameters()}
            groups: dict[float, list] = {1.0: []}
            for p in params:
                name = names.get(id(p), "")
                scale = next((s for prefix, s in scales if name.startswith(prefix)), 1.0)
                groups.setdefault(scale, []).append(p)
            optimizer = make_optimizer(
                [{"params": ps, "lr_scale": s} for s, ps in groups.items() if ps]
            )
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * group["lr_scale"]
            return optimizer

        return make

    def uses(self, buffer) -> bool:
        """Whether a component keeps ``buffer`` (the run's replay memory)."""
        return any(getattr(c, "buffer", None) is buffer for c in self.items.values())

    def provider(self, hook: str):
        """The one component method for ``hook`` (``loss``, ``predict``), or None."""
        return self.hooks[hook][0] if self.hooks[hook] else None

    def __getitem__(self, hook: str) -> list:
        return self.hooks[hook]

    def state_dict(self) -> dict:
        return {n: c.state_dict() for n, c in self.items.items() if hasattr(c, "state_dict")}

    def load_state_dict(self, state: dict) -> None:
        for name, c in self.items.items():
            if hasattr(c, "load_state_dict"):
                c.load_state_dict(state[name])


def adapt(
    model: nn.Module,
    exp: Experience,
    optimizer: torch.optim.Optimizer,
    make_optimizer,
    reset: bool = False,
) -> torch.optim.Optimizer:
    """Grow the model's head for the experience's classes (:func:`clrun.models.adapt_model`);
    returns the optimiser to train with: a new one over the grown model (or a fresh one with
    ``reset``), else ``optimizer`` itself."""
    before = dict(model.named_parameters())
    if adapt_model(model, exp) or reset:
        return rebuild_optimizer(make_optimizer, model, optimizer, not reset, before)
    return optimizer


def rebuild_optimizer(
    make_optimizer,
    model: nn.Module,
    old: torch.optim.Optimizer,
    keep_state: bool,
    before: dict[str, nn.Parameter] | None = None,
) -> torch.optim.Optimizer:
    """A new optimiser over the model's current parameters; parameters that survived keep
    their optimiser state (momentum, Adam moments) unless ``keep_state`` is false.

    ``before``: the model's named parameters before it grew. A parameter that a grown copy
    replaced (an incremental head's weight and bias) keeps its state too, zero-padded for the new
    units: exactly the state of a head allocated in full from the start whose unseen units were
    masked (zero gradients, so zero moments; one step count). State that is not the parameter's
    shape (a factored second moment) cannot be padded; that parameter starts afresh."""
    new = make_optimizer(model.parameters())
    if not keep_state:
        return new
    before = before or {}
    for name, p in model.named_parameters():
        was = before.get(name, p)
        saved = old.state.get(was)
        if saved is None:
            continue
        if was is p:
            new.state[p] = saved
        elif (grown := _grown_state(saved, was.shape, p)) is not None:
            new.state[p] = grown
    return new


def _grown_state(saved: dict, shape: torch.Size, p: torch.Tensor) -> dict | None:
    part = old_part(shape)
    if len(shape) != p.dim() or any(s > n for s, n in zip(shape, p.shape, strict=True)):
        return None  # not a grown copy of the old parameter
    state = {}
    for key, value in saved.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape != shape:
                return None
            padded = value.new_zeros(p.shape)
            padded[part] = value
            value = padded
        state[key] = value
    return state
