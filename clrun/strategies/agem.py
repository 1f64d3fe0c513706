"""Averaged Gradient Episodic Memory (A-GEM; Chaudhry, Ranzato, Rohrbach & Elhoseiny, ICLR 2019,
"Efficient Lifelong Learning with A-GEM").

Memory: ``post_update`` stores ``patterns_per_experience`` samples of the experience, a uniformly
random subset drawn with the component's seeded generator (raw, in their compact dtype; A-GEM
keeps its own memory, not the run's buffer). ``after_backward``: the reference gradient g_ref is
the gradient of the cross-entropy on ``sample_size`` samples drawn uniformly without replacement
from the memories of all earlier experiences (the model in its training mode); if the current
gradient g (``p.grad``: the whole loss) has ⟨g, g_ref⟩ < 0 it is replaced by
g̃ = g − (⟨g, g_ref⟩ / ⟨g_ref, g_ref⟩) g_ref, so that ⟨g̃, g_ref⟩ = 0; otherwise it is left as is.
The paper uses 256 for ``sample_size`` (its episodic-memory batch).

Works in every scenario (the paper: one head per task). State: the memories and the generator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.components import RunState
from clrun.strategies.gem import FIELDS, flat_grad, write_grad


def agem_project(g: Tensor, g_ref: Tensor) -> Tensor:
    """``g`` itself (the same tensor) if ⟨g, g_ref⟩ ≥ 0, else its projection onto the half-space
    ⟨·, g_ref⟩ ≥ 0: g − (⟨g, g_ref⟩ / ⟨g_ref, g_ref⟩) g_ref, computed in float64."""
    g64, r64 = g.double(), g_ref.double()
    dot = g64 @ r64
    if bool(dot >= 0):
        return g
    return (g64 - (dot / (r64 @ r64)) * r64).to(g.dtype)


class AGEM:
    def __init__(self, patterns_per_experience: int = 256, sample_size: int = 256, seed: int = 0):
        for name, v in (
            ("patterns_per_experience", patterns_per_experience),
            ("sample_size", sample_size),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"A-GEM {name}={v!r} must be an integer ≥ 1")
        self.patterns_per_experience, self.sample_size = patterns_per_experience, sample_size
        self.generator = torch.Generator().manual_seed(seed)
        self.memory: dict[int, dict[str, Tensor]] = {}  # experience → raw samples
        self._pool: dict[str, Tensor] | None = None  # all memories together (a cache)

    def after_backward(self, state: RunState) -> None:
        past = [k for k in sorted(self.memory) if k < state.experience]
        if not past:
            return
        if self._pool is None:
            self._pool = {f: torch.cat([self.memory[k][f] for k in past]) for f in FIELDS}
        pool = self._pool
        n = len(pool["y"])
        idx = torch.randperm(n, generator=self.generator)[: self.sample_size].to(pool["y"].device)
        x, y, t, e = (pool[f][idx] for f in FIELDS)
        params = [p for p in state.model.parameters() if p.requires_grad]
        x = state.model_input(x, e)
        with state.autocast():
            loss = F.cross_entropy(state.model(x, t), y)
        ref = torch.autograd.grad(loss, params, allow_unused=True)
        g = flat_grad([p.grad for p in params], params)
        new = agem_project(g, flat_grad(list(ref), params))
        if new is not g:
            used = [p.grad is not None or r is not None for p, r in zip(params, ref, strict=True)]
            write_grad(new, params, used)

    @torch.no_grad()
    def post_update(self, state: RunState, exp: Experience) -> None:
        n = min(len(exp), self.patterns_per_experience)
        idx = torch.randperm(len(exp), generator=self.generator)[:n].to(exp.y.device)
        self.memory[exp.index] = {f: getattr(exp, f)[idx] for f in FIELDS}
        self._pool = None

    def forget(self, state: RunState, experiences: list[int]) -> None:
        """Continual unlearning: the forgotten experiences' samples leave the memory."""
        from clrun.unlearning import without_experiences

        kept = {k: without_experiences(m, experiences) for k, m in self.memory.items()}
        self.memory = {k: m for k, m in kept.items() if len(m["y"])}
        self._pool = None

    def state_dict(self) -> dict:
        return {
            "memory": [[k, dict(m)] for k, m in sorted(self.memory.items())],
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.memory = {int(k): dict(m) for k, m in state["memory"]}
        self.generator.set_state(state["generator"])
        self._pool = None
