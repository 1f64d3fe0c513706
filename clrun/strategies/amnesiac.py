"""Amnesiac unlearning (Graves, Nagisetty & Ganesh, "Amnesiac Machine Learning", AAAI 2021), one
experience at a time, for any strategy it is composed with (``conf/strategy/amnesiac_*.yaml``).

Learning: the component records the update each experience made to the model, Δθ_k = θ at the end
of experience k − θ before it (units the model grew for it: from their initial values), for every floating-point
tensor of the model's state: parameters and running statistics (BatchNorm). The recorded updates of
all experiences sum to the model's total change since its first step (a grown unit counts from its
initialisation). Memory: one model-sized tensor set per experience not yet forgotten
(``memory_mb()``, reported in ``summary.json`` under ``component_memory_mb``).

Unlearning (hook ``unlearn``, called by the runner at a request of ``unlearning.requests``): the
updates of the experiences to forget are subtracted, θ ← θ − Σ_j Δθ_j (the paper's rule, with
experiences for its batches), and their records are dropped. Later experiences' updates stay,
although they were computed from a model that had seen the forgotten data: this is the method's
approximation, measured by the reference-run comparison of :mod:`clrun.unlearning`. Output units
the model grew for a forgotten experience (its task's head in a multi-head model, its new classes'
units in an incremental head) exist only for that experience's data: they go back to their
initial values, and later records drop their part (later experiences trained them by distillation
or replay of the forgotten data). The optimiser's state (momentum, Adam's moments), which holds
the forgotten experiences' gradients, is cleared. Optionally,
``repair_steps`` minibatch steps of cross-entropy on the retained data repair the damage, as the
paper suggests: the samples come from the run's replay buffer, from which the runner has already
removed every sample of the forgotten experiences, so this needs a strategy with a buffer
(``amnesiac_replay``). The repair uses the run's optimiser and is recorded as part of the update
of the experience after which the request came.

Scenarios: every one (task-, domain-, class-incremental; online streams, where an experience's
update accumulates over its mini-experiences). State: the records and the current snapshot.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import int_at_least, require
from clrun.components import RunState
from clrun.config import ConfigError
from clrun.strategies.utils import old_part


def _float_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The model's parameters and floating-point buffers (not integer counters or class lists)."""
    return {n: v.detach().clone() for n, v in model.state_dict().items() if v.is_floating_point()}


def add_into(total: dict[str, Tensor], delta: dict[str, Tensor]) -> None:
    """total += delta, per tensor; a tensor that grew in between is added on its old part."""
    for name, d in delta.items():
        t = total.get(name)
        if t is None:
            total[name] = d.clone()
        elif t.shape == d.shape:
            t += d
        else:
            grown = torch.zeros(
                torch.Size(map(max, t.shape, d.shape)), dtype=t.dtype, device=t.device
            )
            grown[old_part(t.shape)] += t
            grown[old_part(d.shape)] += d
            total[name] = grown


def _grown(shape: tuple, old: tuple | None, new: tuple) -> Tensor:
    """Mask, over a tensor of ``shape``, of the entries that lie in ``new`` but not in ``old``."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[tuple(slice(0, min(a, b)) for a, b in zip(shape, new, strict=True))] = True
    if old is not None:
        mask[tuple(slice(0, min(a, b)) for a, b in zip(shape, old, strict=True))] = False
    return mask


class Amnesiac:
    def __init__(self, repair_steps: int = 0, repair_batch_size: int = 128):
        require("Amnesiac repair_steps", repair_steps, int_at_least(0))
        require("Amnesiac repair_batch_size", repair_batch_size, int_at_least(1))
        self.repair_steps, self.repair_batch_size = repair_steps, repair_batch_size
        self.updates: dict[int, dict[str, Tensor]] = {}  # experience → Δθ
        self.before: dict[str, Tensor] | None = None  # θ at the first step of this training pass
        self.shapes: dict[str, tuple] = {}  # every tensor's shape as last seen
        self.created: dict[int, dict[str, tuple]] = {}  # experience → {name: (old shape, init)}
        self.check_growth = False  # until the first step after pre_update

    @torch.no_grad()
    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.repair_steps and state.buffer is None:
            raise ConfigError(
                f"strategy.repair_steps={self.repair_steps} repairs on retained replay samples, "
                "but this strategy has no replay buffer: use strategy=amnesiac_replay, or "
                "strategy.repair_steps=0"
            )
        if not self.shapes:  # the model as built, before it grows for the first experience
            self.shapes = {n: tuple(v.shape) for n, v in _float_state(state.model).items()}
        self.before, self.check_growth = _float_state(state.model), True

    @torch.no_grad()
    def after_backward(self, state: RunState) -> None:
        if not self.check_growth:
            return
        # First step of this pass: the model grew for it after pre_update, and no parameter has
        # changed yet (running statistics have, in the forward pass: their snapshot is older).
        created = self.created.setdefault(state.benchmark.origin(state.experience), {})
        for name, v in _float_state(state.model).items():
            if self.shapes.get(name) != tuple(v.shape):  # new, or grew for this experience
                start = v.clone()
                if name in self.before:
                    start[old_part(self.before[name].shape)] = self.before[name]
                self.before[name] = start
                old, init = created.get(name, (self.shapes.get(name), v[:0]))
                init_now = v.clone()
                init_now[old_part(init.shape)] = init  # units created earlier keep their init
                created[name] = (old, init_now)
                self.shapes[name] = tuple(v.shape)
        self.check_growth = False

    @torch.no_grad()
    def post_update(self, state: RunState, exp: Experience) -> None:
        self._record(state, state.benchmark.origin(exp.index))

    def _record(self, state: RunState, experience: int) -> None:
        if self.before is None or self.check_growth:  # no step taken: nothing changed
            self.before, self.check_growth = None, False
            return
        after = _float_state(state.model)
        delta = {n: after[n] - b for n, b in self.before.items()}
        add_into(self.updates.setdefault(experience, {}), delta)
        self.before, self.check_growth = None, False

    @torch.no_grad()
    def unlearn(self, state: RunState, experiences: list[int]) -> None:
        model_state = state.model.state_dict()
        for j in experiences:
            for name, d in self.updates.pop(j, {}).items():
                model_state[name][old_part(d.shape)] -= d
        for j in experiences:  # units grown for j: back to their initial values
            for name, (old, init) in self.created.pop(j, {}).items():
                region = _grown(init.shape, old, init.shape)
                model_state[name][old_part(init.shape)][region] = init[region]
                for u in self.updates.values():
                    if name in u:
                        u[name][_grown(u[name].shape, old, init.shape)] = 0
        if state.optimizer is not None:  # momentum / Adam moments hold the forgotten gradients
            state.optimizer.state.clear()
        if self.repair_steps:
            with torch.enable_grad():
                self._repair(state)

    def _repair(self, state: RunState) -> None:
        buffer = state.buffer
        if buffer is None or len(buffer) == 0:
            return  # nothing retained in memory yet
        model, was_training = state.model, state.model.training
        model.train()
        self.before = _float_state(model)
        for _ in range(self.repair_steps):
            batch = buffer.sample(self.repair_batch_size)
            x = state.model_input(batch.x, batch.e, train=True)
            with state.autocast():
                loss = F.cross_entropy(model(x, batch.t), batch.y)
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            state.optimizer.step()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"the repair loss became {loss.item()}")
        self._record(state, state.benchmark.origin(state.experience))
        model.train(was_training)

    def memory_mb(self) -> float:
        """Memory held by the recorded updates and the initial values of grown units."""
        tensors = [d for u in self.updates.values() for d in u.values()]
        tensors += [init for c in self.created.values() for _, init in c.values()]
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20

    def state_dict(self) -> dict:
        return {
            "updates": self.updates,
            "before": self.before,
            "shapes": self.shapes,
            "check_growth": self.check_growth,
            "created": {
                j: {n: [list(o) if o is not None else None, init] for n, (o, init) in c.items()}
                for j, c in self.created.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.updates = {int(k): dict(v) for k, v in state["updates"].items()}
        self.before = None if state["before"] is None else dict(state["before"])
        self.shapes = {n: tuple(s) for n, s in state["shapes"].items()}
        self.check_growth = state["check_growth"]
        self.created = {
            int(j): {n: (tuple(o) if o is not None else None, init) for n, (o, init) in c.items()}
            for j, c in state["created"].items()
        }
