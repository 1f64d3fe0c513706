"""Riemannian Walk (Chaudhry, Dokania, Ajanthan & Torr, ECCV 2018, "Riemannian Walk for
Incremental Learning: Understanding Forgetting and Intransigence"): the regularisation part.

Two importances, both from the gradient g of the loss without RWalk's own penalty, as in the
authors' code (``penalty`` returns the penalty's value without a graph; ``after_backward`` reads
``p.grad`` as g, then adds the penalty's gradient to it, as SI does), accumulated over windows of
``delta_t`` optimiser steps (Δt; the last, possibly shorter, window of an experience is closed in
``post_update``):

- EWC++ (the paper's online Fisher): at the end of each window F ← ``ewc_alpha``·F_w +
  (1 − ``ewc_alpha``)·F, F_w the mean of g² (squared minibatch gradients, as in the authors' code)
  over the window. F starts at 0 and is never reset: it runs over the whole stream.
- The path score: along the window ω_w = Σ −g·Δθ (Δθ the optimiser's actual updates, recorded
  in ``after_backward`` / ``after_step``); at its end s_w = max(0, ω_w / (½ F (θ − θ_w)² +
  ``epsilon``)), the loss decrease normalised by the Fisher-weighted distance (the KL divergence)
  travelled in the window, θ_w the parameters at the window's start; s_w is clipped at 0 as in
  the authors' code. The experience's score is s = Σ_w s_w.

``post_update``: S ← s after the first experience, S ← ½ (S + s) after later ones (the paper's
averaging, against intransigence); F and S are each normalised to [0, 1] by their minimum and
maximum over all parameters (the authors' code), and θ* ← θ. ``penalty``:
``ewc_lambda`` · Σ (F̂ + Ŝ) (θ − θ*)².

``score_update=accumulate`` replaces the averaging by S ← S + ½ (S + s) = 1.5·S + ½·s, which
is what the authors' code computes (facebookresearch/agem, ``model/model.py``: ``update_score``
is a ``tf.assign_add`` of the average; their first score is doubled before it, so S = s after
the first experience either way). Older experiences' scores then grow by 1.5 per experience
instead of halving, and dominate Ŝ after the normalisation.

``path_score=False`` drops the score: the penalty is ``ewc_lambda`` · Σ F̂ (θ − θ*)², EWC++ alone
(the paper's online Fisher, one penalty anchored at the end of the last experience). This is the
EWC of the RWalk and A-GEM authors' code (facebookresearch/agem, ``model/model.py``: its ``EWC``
uses the same running Fisher, normalisation and penalty as its ``RWALK``, without the score).

The paper trains RWalk with a small replay memory; replay is a separate component, so compose
the two in YAML (``conf/strategy/replay_rwalk.yaml``: ``defaults: [replay, rwalk, _self_]``);
with replay, g includes the loss of the replayed samples. This component alone is the
regularisation (``strategy=rwalk``). Works in every scenario. Parameters that grew since θ*
(incremental heads) are penalised on their old part only; new units start with F = S = 0.
Frozen parameters are not tracked. List RWalk before components that rewrite gradients (GEM,
A-GEM). State: F, S, the penalty weights F̂ + Ŝ, θ* (and, during an experience, the open window
and the experience's score).
"""

from __future__ import annotations

import torch
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import (
    boolean,
    int_at_least,
    number_above,
    number_at_least,
    number_in,
    one_of,
    require,
)
from clrun.components import RunState
from clrun.strategies.utils import add_quadratic_grad, anchor_of, old_part, quadratic


def _fit(t: Tensor, like: Tensor) -> Tensor:
    """``t`` zero-padded to the (grown) shape of ``like``."""
    if t.shape == like.shape:
        return t
    out = torch.zeros_like(like)
    out[old_part(t.shape)] = t
    return out


def _min_max(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Scale to [0, 1] by the minimum and maximum over all tensors together."""
    filled = [v for v in values.values() if v.numel()]
    if not filled:
        return dict(values)
    lo = torch.stack([v.min() for v in filled]).min()
    hi = torch.stack([v.max() for v in filled]).max()
    span = (hi - lo).clamp(min=torch.finfo(lo.dtype).tiny)
    return {k: (v - lo) / span for k, v in values.items()}


SCORE_UPDATES = ("average", "accumulate")


class RWalk:
    def __init__(
        self,
        ewc_lambda: float = 1.0,
        ewc_alpha: float = 0.9,
        delta_t: int = 10,
        epsilon: float = 1e-3,
        path_score: bool = True,
        score_update: str = "average",
    ):
        require("RWalk ewc_lambda", ewc_lambda, number_at_least(0))
        require("RWalk ewc_alpha", ewc_alpha, number_in(0, 1, open_lo=True))
        require("RWalk delta_t", delta_t, int_at_least(1))
        require("RWalk epsilon", epsilon, number_above(0))
        require("RWalk score_update", score_update, one_of(SCORE_UPDATES))
        require("RWalk path_score", path_score, boolean())
        self.ewc_lambda, self.ewc_alpha = float(ewc_lambda), float(ewc_alpha)
        self.delta_t, self.epsilon = delta_t, float(epsilon)
        self.path_score, self.score_update = path_score, score_update
        self.fisher: dict[str, Tensor] = {}  # F, the EWC++ running Fisher
        self.score: dict[str, Tensor] = {}  # S, over the experiences so far
        self.weights: dict[str, Tensor] = {}  # F̂ + Ŝ, the penalty's weights
        self.anchor: dict[str, Tensor] = {}  # θ*
        self.reanchor = False  # set by forget: the next pre_update anchors at the model
        self.experience: int | None = None  # the experience the fields below belong to
        self.exp_score: dict[str, Tensor] = {}  # s of the experience being trained
        self.window: dict[str, dict[str, Tensor]] = {}  # open window: start θ_w, ω_w, Σ g²
        self.window_steps = 0
        self._grad: dict[str, Tensor] = {}
        self._before: dict[str, Tensor] = {}

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor | None:
        if not self.weights or self.ewc_lambda == 0:
            return None
        with torch.no_grad():  # its gradient is added in after_backward, once g is read
            return self.ewc_lambda * quadratic(state.model, self.weights, self.anchor)

    @torch.no_grad()
    def after_backward(self, state: RunState) -> None:
        params = [(n, p) for n, p in state.model.named_parameters() if p.requires_grad]
        if self.experience != state.experience:  # first step of an experience
            self.experience = state.experience
            self.exp_score = {n: torch.zeros_like(p) for n, p in params}
            self.fisher = {
                n: _fit(self.fisher[n], p) if n in self.fisher else torch.zeros_like(p)
                for n, p in params
            }
            self._open_window(params)
        self._grad, self._before = {}, {}
        for name, p in params:
            if p.grad is not None and name in self.window:  # g: the loss without the penalty
                g = p.grad.clone()
                self.window[name]["sq_grad"] += g.pow(2)
                self._grad[name], self._before[name] = g, p.detach().clone()
        if self.ewc_lambda != 0:  # now the penalty's gradient
            add_quadratic_grad(params, self.weights, self.anchor, 2 * self.ewc_lambda)

    @torch.no_grad()
    def after_step(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> None:
        params = dict(state.model.named_parameters())
        for name, g in self._grad.items():
            self.window[name]["path"] -= g * (params[name] - self._before[name])
        self._grad, self._before = {}, {}
        self.window_steps += 1
        if self.window_steps == self.delta_t:
            self._close_window(state)

    def _open_window(self, params: list[tuple[str, Tensor]]) -> None:
        self.window = {
            n: {
                "start": p.detach().clone(),
                "path": torch.zeros_like(p),
                "sq_grad": torch.zeros_like(p),
            }
            for n, p in params
        }
        self.window_steps = 0

    def _close_window(self, state: RunState) -> None:
        a = self.ewc_alpha
        params = [(n, p) for n, p in state.model.named_parameters() if n in self.window]
        for name, p in params:
            w = self.window[name]
            f = self.fisher[name].mul_(1 - a).add_(w["sq_grad"], alpha=a / self.window_steps)
            kl = 0.5 * f * (p.detach() - w["start"]).pow(2)
            self.exp_score[name] += (w["path"] / (kl + self.epsilon)).clamp_(min=0)
        self._open_window(params)

    @torch.no_grad()
    def post_update(self, state: RunState, exp: Experience) -> None:
        if self.experience != exp.index:  # no training step in this experience
            return
        if self.window_steps:
            self._close_window(state)
        for name, s in self.exp_score.items():
            old = self.score.get(name)
            if old is None:
                self.score[name] = s
            elif self.score_update == "average":  # the paper
                self.score[name] = 0.5 * (_fit(old, s) + s)
            else:  # the authors' code: assign_add of the average
                self.score[name] = _fit(old, s) + 0.5 * (_fit(old, s) + s)
        self.exp_score, self.window, self.window_steps = {}, {}, 0
        fisher, score = _min_max(self.fisher), _min_max(self.score)
        if self.path_score:
            self.weights = {n: fisher[n] + score[n] for n in self.score}
        else:  # EWC++ alone
            self.weights = {n: fisher[n] for n in self.score}
        self.anchor = anchor_of(state.model)

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.reanchor:
            self.anchor = anchor_of(state.model)
            self.reanchor = False

    def forget(self, state: RunState, experiences: list[int]) -> None:
        """Continual unlearning: the Fisher and path scores, running averages over experiences,
        cannot be split and are kept (they weigh parameters, they store no samples); the anchor
        carries the forgotten updates and moves to the unlearned parameters at the next
        experience."""
        self.reanchor = bool(self.anchor)

    def state_dict(self) -> dict:
        return {
            "reanchor": self.reanchor,
            "fisher": self.fisher,
            "score": self.score,
            "weights": self.weights,
            "anchor": self.anchor,
            "experience": self.experience,
            "exp_score": self.exp_score,
            "window": self.window,
            "window_steps": self.window_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.fisher, self.score = dict(state["fisher"]), dict(state["score"])
        self.weights, self.anchor = dict(state["weights"]), dict(state["anchor"])
        self.experience, self.exp_score = state["experience"], dict(state["exp_score"])
        self.window, self.window_steps = dict(state["window"]), state["window_steps"]
        self.reanchor = bool(state.get("reanchor", False))
