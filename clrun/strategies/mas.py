"""Memory Aware Synapses (Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars, ECCV 2018).

``post_update``: the importance of each parameter on the experience is the mean over its samples
of |∂‖f(x)‖²₂ / ∂θ|, f(x) the model's output (the logits; with a multi-head model, the sample's
own head): per-sample gradients, as in the paper's formula, with the model in eval mode, over the
experience's training inputs (``importance_samples`` of them, null = all; no labels are used).
It is accumulated over experiences: with ``alpha`` in [0, 1], a running average
Ω ← ``alpha``·Ω + (1 − ``alpha``)·Ω_new (Avalanche and FACIL; the first experience sets Ω = Ω_new);
with ``alpha`` null, the paper's (and the authors' code's) sum Ω ← Ω + Ω_new. Then θ* ← θ.
``penalty``: ``mas_lambda`` · Σ Ω (θ − θ*)² (λ in the paper, no ½).

``samples_per_gradient`` k > 1 takes the absolute value of the gradient of a group of k
consecutive samples instead, Ω = (1/n) Σ_groups |∂ Σ_{x in group} ‖f(x)‖² / ∂θ| (one backward
per group; a trailing smaller group counts too): what the A-GEM authors' code computes, with
minibatches of 10 (facebookresearch/agem, ``model/model.py``, ``accumulate_hebbian_scores``).
Gradients of different samples can cancel inside a group, so this Ω is at most the per-sample one.

Works in every scenario. Parameters that grew since θ* (incremental heads) are penalised on their
old part only; new units start with Ω = 0. Frozen parameters are not tracked; a parameter the
output does not depend on gets Ω = 0. State: Ω, θ* and the sampling generator.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from clrun import distributed
from clrun.benchmarks import Experience
from clrun.checks import int_at_least, number_at_least, optional, probability, require
from clrun.components import RunState
from clrun.strategies.utils import anchor_of, old_part, quadratic, sum_per_sample_grads


class MAS:
    def __init__(
        self,
        mas_lambda: float = 0.1,
        alpha: float | None = 0.5,
        importance_samples: int | None = None,
        importance_batch_size: int = 64,
        seed: int = 0,
        samples_per_gradient: int = 1,
    ):
        require("MAS mas_lambda", mas_lambda, number_at_least(0))
        require("MAS alpha", alpha, optional(probability(), "null (sum, as in the paper)"))
        require(
            "MAS importance_samples", importance_samples, optional(int_at_least(1), "null (= all)")
        )
        require("MAS importance_batch_size", importance_batch_size, int_at_least(1))
        require("MAS samples_per_gradient", samples_per_gradient, int_at_least(1))
        self.mas_lambda = float(mas_lambda)
        self.alpha = None if alpha is None else float(alpha)
        self.importance_samples = importance_samples
        self.importance_batch_size = importance_batch_size
        self.samples_per_gradient = samples_per_gradient
        self.generator = torch.Generator().manual_seed(seed)
        self.importance: dict[str, Tensor] = {}  # Ω
        self.anchor: dict[str, Tensor] = {}  # θ*
        self.reanchor = False  # set by forget: the next pre_update anchors at the model

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor | None:
        if not self.importance or self.mas_lambda == 0:
            return None
        return self.mas_lambda * quadratic(state.model, self.importance, self.anchor)

    @torch.no_grad()
    def post_update(self, state: RunState, exp: Experience) -> None:
        new = self._importance(state, exp)
        for name, omega in new.items():
            old = self.importance.get(name)
            if old is not None:
                if self.alpha is None:
                    omega[old_part(old.shape)] += old
                else:
                    omega.mul_(1 - self.alpha)
                    omega[old_part(old.shape)] += self.alpha * old
            self.importance[name] = omega
        self.anchor = anchor_of(state.model)

    def _importance(self, state: RunState, exp: Experience) -> dict[str, Tensor]:
        """Mean over the experience's samples of |∂‖f(x)‖² / ∂θ|, one gradient per sample."""
        n = len(exp) if self.importance_samples is None else min(len(exp), self.importance_samples)
        if n < len(exp):
            exp = exp.subset(
                torch.randperm(len(exp), generator=self.generator)[:n].to(exp.y.device)
            )
        if self.samples_per_gradient == 1:
            omega = sum_per_sample_grads(
                state, exp, lambda out, y: out.pow(2).sum(1), torch.abs, self.importance_batch_size
            )
        else:
            omega = self._group_sums(state, exp)
        return {k: v / max(n, 1) for k, v in omega.items()}

    def _group_sums(self, state: RunState, exp: Experience) -> dict[str, Tensor]:
        """Σ over groups of ``samples_per_gradient`` consecutive samples of |∂ Σ ‖f(x)‖² / ∂θ|,
        with the model in eval mode; the optimiser's gradients are left as they were."""
        model, k = state.model, self.samples_per_gradient
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        names = list(params)

        def groups(part: range) -> dict[str, Tensor]:  # a distributed run: a shard of groups
            sums = {n: torch.zeros_like(p) for n, p in params.items()}
            for i in range(part.start * k, min(part.stop * k, len(exp)), k):
                idx = torch.arange(i, min(i + k, len(exp)), device=exp.y.device)
                b = exp.subset(idx)
                out = model(state.model_input(b.x, b.e), b.t)
                grads = torch.autograd.grad(
                    out.pow(2).sum(), [params[n] for n in names], allow_unused=True
                )
                for name, g in zip(names, grads, strict=True):
                    if g is not None:
                        sums[name] += g.abs()
            return sums

        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                return distributed.sum_sharded(math.ceil(len(exp) / k), groups)
        finally:
            model.train(was_training)

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.reanchor:
            self.anchor = anchor_of(state.model)
            self.reanchor = False

    def forget(self, state: RunState, experiences: list[int]) -> None:
        """Continual unlearning: the importance, a running sum over experiences, cannot be split
        and is kept (it weighs parameters, it stores no samples); the anchor carries the
        forgotten updates and moves to the unlearned parameters at the next experience."""
        self.reanchor = bool(self.anchor)

    def state_dict(self) -> dict:
        return {
            "importance": self.importance,
            "anchor": self.anchor,
            "generator": self.generator.get_state(),
            "reanchor": self.reanchor,
        }

    def load_state_dict(self, state: dict) -> None:
        self.importance, self.anchor = dict(state["importance"]), dict(state["anchor"])
        self.reanchor = bool(state.get("reanchor", False))
        self.generator.set_state(state["generator"])
