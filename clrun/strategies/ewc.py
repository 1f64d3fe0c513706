"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) and its online variant
(Schwarz et al., ICML 2018, "Progress & Compress").

``post_update``: the diagonal Fisher information of the experience's training data is computed
from per-sample gradients of the log-likelihood (``fisher=empirical``: true labels, as most CL
code does; ``fisher=sampled``: labels drawn from the model's predictive distribution, the Fisher
of the paper; ``fisher=predicted``: the model's most likely label, as van de Ven & Tolias's
code), over ``fisher_samples`` samples (null = all), with the model in eval mode; the
parameters are snapshotted. ``penalty``: ``ewc_lambda``/2 · Σ F (θ − θ*)².

``mode=separate`` keeps one (F, θ*) pair per experience (memory grows with the stream, by
definition) and penalises with their merged form (``merge``): one quadratic with the same value
and gradients, so a training step costs the same after 2 experiences as after 20. ``mode=online``
keeps one pair: F ← ``decay_factor``·F + F_new, θ* ← θ. Parameters that grew since a snapshot
(incremental heads) are penalised on their old part only; new heads not at all. Works in every
scenario. State: the Fisher matrices and snapshots (the merged form is rebuilt from them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import int_at_least, number_at_least, one_of, optional, probability, require
from clrun.components import RunState
from clrun.strategies.utils import anchor_of, old_part, quadratic, sum_per_sample_grads

MODES = ("separate", "online")
FISHERS = ("empirical", "sampled", "predicted")


class EWC:
    def __init__(
        self,
        ewc_lambda: float = 5000.0,
        mode: str = "separate",
        decay_factor: float = 1.0,
        fisher: str = "empirical",
        fisher_samples: int | None = None,
        fisher_batch_size: int = 64,
        seed: int = 0,
    ):
        require("EWC ewc_lambda", ewc_lambda, number_at_least(0))
        require("EWC mode", mode, one_of(MODES))
        require("EWC decay_factor", decay_factor, probability())
        require("EWC fisher", fisher, one_of(FISHERS))
        require("EWC fisher_samples", fisher_samples, optional(int_at_least(1), "null (= all)"))
        require("EWC fisher_batch_size", fisher_batch_size, int_at_least(1))
        self.ewc_lambda, self.mode, self.decay_factor = float(ewc_lambda), mode, float(decay_factor)
        self.fisher, self.fisher_samples = fisher, fisher_samples
        self.fisher_batch_size = int(fisher_batch_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.terms: list[dict] = []  # [{"fisher": {...}, "params": {...}, "experiences": [...]}]
        self.reanchor = False  # set by forget: the next pre_update re-anchors every term
        self._merged: tuple | None = None  # merge(self.terms), rebuilt whenever the terms change

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor | None:
        if not self.terms or self.ewc_lambda == 0:
            return None
        if self._merged is None:
            self._merged = merge(self.terms)
        weights, anchor, const = self._merged
        return 0.5 * self.ewc_lambda * (quadratic(state.model, weights, anchor) + const)

    def post_update(self, state: RunState, exp: Experience) -> None:
        fisher = self._fisher(state, exp)
        params = anchor_of(state.model)
        experiences = [state.benchmark.origin(exp.index)]
        if self.mode == "online" and self.terms:
            prev = self.terms[0]["fisher"]
            for name, f in fisher.items():
                old = prev.get(name)
                if old is not None:
                    f[old_part(old.shape)] += self.decay_factor * old
            experiences = sorted(set(self.terms[0]["experiences"]) | set(experiences))
            self.terms = []
        self.terms.append({"fisher": fisher, "params": params, "experiences": experiences})
        self._merged = None

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.reanchor:  # after unlearning: protect the unlearned parameters
            for term in self.terms:
                term["params"] = anchor_of(state.model)
            self.reanchor, self._merged = False, None

    def forget(self, state: RunState, experiences: list[int]) -> None:
        """Separate mode drops the forgotten experiences' Fisher terms; online mode's single
        Fisher cannot be split and is kept (it weighs parameters, it stores no samples). Every
        remaining anchor carries the forgotten updates, so the anchors move to the unlearned
        parameters at the next experience."""
        if self.mode == "separate":
            self.terms = [t for t in self.terms if not set(t["experiences"]) <= set(experiences)]
        self.reanchor, self._merged = True, None

    def _fisher(self, state: RunState, exp: Experience) -> dict[str, Tensor]:
        n = len(exp) if self.fisher_samples is None else min(len(exp), int(self.fisher_samples))
        samples = exp.subset(
            torch.randperm(len(exp), generator=self.generator)[:n].to(exp.y.device)
        )
        if self.fisher != "empirical":  # labels from the model: drawn, or its most likely one
            was_training = state.model.training
            state.model.eval()
            batches = (samples.subset(torch.arange(i, min(i + 256, n))) for i in range(0, n, 256))
            with torch.no_grad():
                logits = torch.cat([state.model(state.model_input(b.x, b.e), b.t) for b in batches])
            state.model.train(was_training)
            if self.fisher == "sampled":
                y = torch.multinomial(F.softmax(logits, -1).cpu(), 1, generator=self.generator)
                y = y.squeeze(1).to(samples.y.device)
            else:
                y = logits.argmax(1)
            samples = Experience(samples.index, samples.x, y, samples.t, samples.e)
        nll = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
        fisher = sum_per_sample_grads(state, samples, nll, torch.square, self.fisher_batch_size)
        return {k: f / max(n, 1) for k, f in fisher.items()}

    def state_dict(self) -> dict:
        return {
            "terms": self.terms,
            "generator": self.generator.get_state(),
            "reanchor": self.reanchor,
        }

    def load_state_dict(self, state: dict) -> None:
        self.terms, self._merged = state["terms"], None
        self.reanchor = bool(state.get("reanchor", False))
        self.generator.set_state(state["generator"])


def merge(terms: list[dict]) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | float]:
    """Σ_k F_k (θ − θ_k)² = A (θ − m)² + c, with A = Σ_k F_k, m = Σ_k F_k θ_k / A (0 where A = 0)
    and c = Σ_k F_k (θ_k − m)² ≥ 0: the per-experience terms as one quadratic, with their value
    and gradients, returned as (weights A, anchor m, constant c). A term taken before a parameter
    grew adds to its old part only."""
    if len(terms) == 1:
        return terms[0]["fisher"], terms[0]["params"], 0.0
    weights, anchor, const = {}, {}, 0.0
    for name in dict.fromkeys(n for t in terms for n in t["fisher"]):
        parts = [(t["fisher"][name], t["params"][name]) for t in terms if name in t["fisher"]]
        shape = torch.Size(max(sizes) for sizes in zip(*(f.shape for f, _ in parts), strict=True))
        a = parts[0][0].new_zeros(shape)
        weighted = a.clone()
        for f, p in parts:
            a[old_part(f.shape)] += f
            weighted[old_part(f.shape)] += f * p
        m = torch.where(a > 0, weighted / a.clamp_min(torch.finfo(a.dtype).tiny), 0.0)
        for f, p in parts:
            const = const + (f * (p - m[old_part(f.shape)]).pow(2)).sum(dtype=torch.float32)
        weights[name], anchor[name] = a, m
    return weights, anchor, const
