"""Hard Attention to the Task (Serra, Surís, Miron & Karatzoglou, "Overcoming Catastrophic
Forgetting with Hard Attention to the Task", ICML 2018).

Every weight layer's units are gated by a_l^t = σ(s · e_l^t), one learned embedding per task
and layer (:class:`~clrun.models.task_nets.HATGates`, put in place of the model's plain
``model=mlp`` / ``model=cnn`` backbone). Defaults and details not in the paper follow the
official code, ``joansj/hat`` ``src/approaches/hat.py`` and ``src/networks/mlp_hat.py``.

Hooks:

- ``train_data`` (every experience, and again on a resumed run): refuses anything but the task
  scenario with a multi-head model (one line); freezes the heads of earlier tasks; remembers the
  steps per epoch B = ⌈n / batch size⌉ and sets the gates' s for the next step.
- ``pre_update``: on the first experience, puts the gated backbone in place; the runner then
  gives the new task its embeddings (N(0, 1), as the official ``torch.nn.Embedding``; earlier
  tasks' embeddings freeze) and rebuilds the optimiser.
- ``penalty``: the attention-mask regulariser, ``c · Σ_l Σ_i a_{l,i}^t (1 − a_{l,i}^{<t}) /
  Σ_l Σ_i (1 − a_{l,i}^{<t})`` (paper Eq. 5; the first task: Σ a / number of units), c = 0.75.
- ``after_backward``: gradient conditioning: the gradient of weight (i, j) of layer l is
  multiplied by 1 − min(a_{l,i}^{<t}, a_{l−1,j}^{<t}) (bias: 1 − a_{l,i}^{<t}; the first layer:
  its output gate alone), with a^{<t} = max over earlier tasks of σ(s_max e); then the
  embedding-gradient compensation of the annealed sigmoid, ×
  s_max / s · (cosh(clamp(s e, ±50)) + 1) / (cosh(e) + 1); then the gradient norm is clipped
  at ``clip_grad_norm`` (10,000 in the official code).
- ``after_step``: embeddings clamped to [−6, 6] (official ``thres_emb``); the s of the next
  step: s = 1/s_max + (s_max − 1/s_max) (b − 1)/(B − 1) for batch b = 1..B of each epoch
  (paper Eq. 3; the official code uses b·batch size / n, which never quite reaches s_max);
  weights whose multiplier is exactly 0 (used by earlier tasks with a = 1 on both sides) are
  put back to their value before the experience. With the paper's plain SGD that is a no-op;
  with momentum or Adam it keeps them bit-identical, which a zero gradient alone would not.
- ``post_update``: a^{≤t} = max(a^{<t}, σ(s_max e^t)).

The paper trains with SGD at lr 0.05 (``optimizer=sgd optimizer.lr=0.05``), batch size 64,
up to 200 epochs with a validation-driven learning-rate decay the runner's loop does not have
(use ``strategy.epochs``). State: a^{<t}, the step inside the experience and B.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from clrun.benchmarks import Experience
from clrun.checks import Rule, is_number, number_above, require
from clrun.components import RunState
from clrun.errors import ConfigError
from clrun.models.task_nets import HATGates, segments
from clrun.strategies.utils import freeze_other_heads, require_task_il

__all__ = ["HAT", "annealed_s", "condition_masks"]

THRES_COSH = 50.0  # official hat.py: clamp of s·e inside the compensation's cosh


def annealed_s(b: int, n_batches: int, s_max: float) -> float:
    """s for batch b = 0..B−1 of an epoch of B batches (paper Eq. 3, b counted from 0)."""
    if n_batches <= 1:
        return s_max
    return 1 / s_max + (s_max - 1 / s_max) * b / (n_batches - 1)


def condition_masks(layers: list[nn.Module], cumulative: list[Tensor]) -> dict[int, tuple]:
    """Per weight layer (by position): the multipliers of its weight's and bias's gradients,
    1 − min(a_post, a_pre) and 1 − a_post."""
    out = {}
    for i, layer in enumerate(layers):
        post = cumulative[i]
        extra = [1] * (layer.weight.dim() - 2)
        w = post.view(-1, 1, *extra).expand_as(layer.weight)
        if i > 0:
            w = torch.minimum(w, cumulative[i - 1].view(1, -1, *extra).expand_as(layer.weight))
        out[i] = (1 - w, 1 - post)
    return out


class HAT:
    """Hard attention masks per task with the annealed sigmoid and gradient compensation."""

    def __init__(
        self,
        s_max: float = 400.0,
        c: float = 0.75,
        clip_grad_norm: float = 10000.0,
        thres_emb: float = 6.0,
    ):
        self.s_max = float(require("strategy.s_max", s_max, number_above(1)))
        non_negative = Rule(lambda v: is_number(v) and v >= 0, "a number ≥ 0")
        self.c = float(require("strategy.c", c, non_negative))
        self.clip = float(require("strategy.clip_grad_norm", clip_grad_norm, number_above(0)))
        self.thres_emb = float(require("strategy.thres_emb", thres_emb, number_above(0)))
        self.cumulative: list[Tensor] | None = None  # a^{<t} per weight layer
        self.task = -1  # the task label being trained
        self.step = 0  # optimiser steps taken in the current experience
        self.n_batches = 1  # B: steps per epoch
        self._protect: dict[int, tuple] = {}  # layer → (multipliers, weight and bias snapshots)

    # ------------------------------------------------------------------ hooks

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        require_task_il(state, "hat")
        freeze_other_heads(state.model, exp.classes_by_task)
        self.n_batches = max(1, math.ceil(len(exp) / state.batch_size))
        if isinstance(state.model.backbone, HATGates):  # a resumed run: snapshot and s again
            self._prepare(state)
        return exp

    def pre_update(self, state: RunState, exp: Experience) -> None:
        tasks = list(exp.classes_by_task)
        if len(tasks) != 1:
            raise ConfigError(f"hat trains one task per experience; this experience has {tasks}")
        model = state.model
        if not isinstance(model.backbone, HATGates):
            model.backbone = HATGates(model.backbone, self.s_max)
        self.task, self.step = tasks[0], 0
        self._prepare(state)

    def penalty(self, state: RunState, batch, x, out) -> Tensor:
        gates = state.model.backbone.gates(self.task, state.model.backbone.s)
        if self.cumulative is None:
            reg = sum(g.sum() for g in gates) / sum(g.numel() for g in gates)
        else:
            num = sum((g * (1 - a)).sum() for g, a in zip(gates, self.cumulative, strict=True))
            reg = num / sum((1 - a).sum() for a in self.cumulative)
        return self.c * reg

    @torch.no_grad()
    def after_backward(self, state: RunState) -> None:
        backbone = state.model.backbone
        for i, layer in enumerate(self._layers(state)):
            if i in self._protect:
                w_mult, b_mult = self._protect[i][0]
                if layer.weight.grad is not None:
                    layer.weight.grad.mul_(w_mult)
                if layer.bias is not None and layer.bias.grad is not None:
                    layer.bias.grad.mul_(b_mult)
        s = backbone.s
        for e in backbone.embeddings[str(self.task)]:
            if e.grad is not None:
                num = torch.cosh(torch.clamp(s * e, -THRES_COSH, THRES_COSH)) + 1
                e.grad.mul_(self.s_max / s * num / (torch.cosh(e) + 1))
        params = [p for p in state.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.clip)

    @torch.no_grad()
    def after_step(self, state: RunState, batch, x, out) -> None:
        backbone = state.model.backbone
        for e in backbone.embeddings[str(self.task)]:
            e.clamp_(-self.thres_emb, self.thres_emb)
        for i, layer in enumerate(self._layers(state)):
            if i in self._protect:
                (w_mult, b_mult), w0, b0 = self._protect[i]
                layer.weight.copy_(torch.where(w_mult == 0, w0, layer.weight))
                if layer.bias is not None:
                    layer.bias.copy_(torch.where(b_mult == 0, b0, layer.bias))
        self.step += 1
        backbone.s = annealed_s(self.step % self.n_batches, self.n_batches, self.s_max)

    @torch.no_grad()
    def post_update(self, state: RunState, exp: Experience) -> None:
        masks = [a.detach().clone() for a in state.model.backbone.gates(self.task)]
        if self.cumulative is None:
            self.cumulative = masks
        else:
            self.cumulative = [
                torch.maximum(a, m) for a, m in zip(self.cumulative, masks, strict=True)
            ]

    # ------------------------------------------------------------------ helpers

    def _layers(self, state: RunState) -> list[nn.Module]:
        _, segs = segments(state.model.backbone.net, "hat")
        return [seg[0] for seg in segs]

    def _prepare(self, state: RunState) -> None:
        """The s of the next step, and the multipliers and snapshots of the conditioning."""
        state.model.backbone.s = annealed_s(self.step % self.n_batches, self.n_batches, self.s_max)
        self._protect = {}
        if self.cumulative is None:
            return
        layers = self._layers(state)
        for i, mults in condition_masks(layers, self.cumulative).items():
            bias = layers[i].bias
            b0 = bias.detach().clone() if bias is not None else None
            self._protect[i] = (mults, layers[i].weight.detach().clone(), b0)

    # ------------------------------------------------------------------ checkpoint

    def state_dict(self) -> dict:
        return {
            "cumulative": self.cumulative,
            "task": self.task,
            "step": self.step,
            "n_batches": self.n_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        self.cumulative = state["cumulative"]
        self.task, self.step = int(state["task"]), int(state["step"])
        self.n_batches = int(state["n_batches"])
