"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017, "Continual Learning Through
Synaptic Intelligence").

Each parameter θ_k keeps a path integral ω_k of its contribution to the decrease of the loss along
the training trajectory. ``after_backward``: the gradient g of the step and θ before the step are
recorded. ``after_step``: ω += −g·Δθ, with Δθ the update the optimiser actually made (momentum,
Adam and weight decay included). ``post_update``: Ω ← max(0, Ω + ω / (Δ² + ``xi``)), Δ the
parameter's total change over the experience (the max(0, ·) only with ``clip_importance``, the
default); then θ* ← θ and ω ← 0. ``penalty``: ``si_lambda`` · Σ Ω (θ − θ*)² (c and ξ in the
paper; no ½, as in the paper).

Which gradient (``gradient``: ``task``, the default, or ``total``). The paper integrates the gradient of the task loss, without the surrogate term
(the authors' code uses its ``unreg_grads``); van de Ven's and Avalanche's implementations use the
gradient of the total loss. We follow the paper, exactly: ``penalty`` returns the penalty's value
without a graph, so ``loss.backward()`` leaves in ``p.grad`` the gradient of everything else in the
loss (the classification loss, plus the penalties of components composed with SI); ``after_backward``
reads that as g, then adds the penalty's gradient 2c·Ω (θ − θ*) to ``p.grad`` itself, so the
optimiser steps on the gradient of the whole loss as usual. A parameter whose only gradient is
SI's penalty (an old task's head) thus gets g = 0 exactly. The clip at 0 is also the authors'
(``relu``): a step against the gradient (as momentum can take) makes ω negative.
``clip_importance=False`` keeps such negative Ω, as van de Ven et al.'s code does (their
``update_omega`` adds ω / (Δ² + ε) unclipped); with ``gradient=total`` this is their SI. List SI
before components that rewrite gradients (GEM, A-GEM), so that they see its penalty's gradient.

Works in every scenario. Parameters that grew since θ* (incremental heads) are penalised on their
old part only; units and parameters created later start with Ω = 0. Frozen parameters are not
tracked. State: Ω and θ* (and, during an experience, ω and the experience's starting point).
"""

from __future__ import annotations

import torch
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import boolean, number_above, number_at_least, one_of, require
from clrun.components import RunState
from clrun.strategies.utils import add_quadratic_grad, anchor_of, old_part, quadratic


class SI:
    def __init__(
        self,
        si_lambda: float = 1.0,
        xi: float = 1e-3,
        gradient: str = "task",
        clip_importance: bool = True,
    ):
        require("SI si_lambda", si_lambda, number_at_least(0))
        require("SI xi", xi, number_above(0))
        require("SI gradient", gradient, one_of(("task", "total")))
        require("SI clip_importance", clip_importance, boolean())
        self.si_lambda, self.xi, self.gradient = float(si_lambda), float(xi), gradient
        self.clip_importance = clip_importance
        self.importance: dict[str, Tensor] = {}  # Ω
        self.anchor: dict[str, Tensor] = {}  # θ*
        self.reanchor = False  # set by forget: the next pre_update anchors at the model
        self.path: dict[str, Tensor] = {}  # ω of the experience being trained
        self.start: dict[str, Tensor] = {}  # θ at the first step of that experience
        self.experience: int | None = None  # the experience ``path`` and ``start`` belong to
        self._grad: dict[str, Tensor] = {}  # this step: g
        self._before: dict[str, Tensor] = {}  # this step: θ before the update

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor | None:
        if not self.importance or self.si_lambda == 0:
            return None
        with torch.no_grad():  # its gradient is added in after_backward, once g is read
            return self.si_lambda * quadratic(state.model, self.importance, self.anchor)

    @torch.no_grad()
    def after_backward(self, state: RunState) -> None:
        params = [(n, p) for n, p in state.model.named_parameters() if p.requires_grad]
        if self.experience != state.experience:  # first step of an experience
            self.experience = state.experience
            self.start = {n: p.detach().clone() for n, p in params}
            self.path = {n: torch.zeros_like(p) for n, p in params}
        self._grad, self._before = {}, {}
        if self.gradient == "task":  # g: the loss without SI's penalty (the paper)
            for name, p in params:
                self._record(name, p)
        if self.si_lambda != 0:  # now the penalty's gradient
            add_quadratic_grad(params, self.importance, self.anchor, 2 * self.si_lambda)
        if self.gradient == "total":  # g: the whole loss (van de Ven's and Avalanche's code)
            for name, p in params:
                self._record(name, p)

    def _record(self, name: str, p: Tensor) -> None:
        if p.grad is not None and name in self.path:
            self._grad[name], self._before[name] = p.grad.clone(), p.detach().clone()

    @torch.no_grad()
    def after_step(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> None:
        params = dict(state.model.named_parameters())
        for name, g in self._grad.items():
            self.path[name] -= g * (params[name] - self._before[name])
        self._grad, self._before = {}, {}

    @torch.no_grad()
    def post_update(self, state: RunState, exp: Experience) -> None:
        if self.experience != exp.index:  # no training step in this experience
            return
        for name, p in state.model.named_parameters():
            if name not in self.path:
                continue
            omega = self.path[name] / ((p - self.start[name]).pow(2) + self.xi)
            old = self.importance.get(name)
            if old is not None:
                omega[old_part(old.shape)] += old
            self.importance[name] = omega.clamp_(min=0) if self.clip_importance else omega
            self.anchor[name] = p.detach().clone()
        self.path, self.start = {}, {}

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.reanchor:
            self.anchor = anchor_of(state.model)
            self.reanchor = False

    def forget(self, state: RunState, experiences: list[int]) -> None:
        """Continual unlearning: Ω, a running sum over experiences, cannot be split and is kept
        (it weighs parameters, it stores no samples); the anchor carries the forgotten updates
        and moves to the unlearned parameters at the next experience."""
        self.reanchor = bool(self.anchor)

    def state_dict(self) -> dict:
        return {
            "importance": self.importance,
            "anchor": self.anchor,
            "path": self.path,
            "start": self.start,
            "experience": self.experience,
            "reanchor": self.reanchor,
        }

    def load_state_dict(self, state: dict) -> None:
        self.importance, self.anchor = dict(state["importance"]), dict(state["anchor"])
        self.path, self.start = dict(state["path"]), dict(state["start"])
        self.experience = state["experience"]
        self.reanchor = bool(state.get("reanchor", False))
