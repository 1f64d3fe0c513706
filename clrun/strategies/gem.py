"""Gradient Episodic Memory (GEM; Lopez-Paz & Ranzato, NeurIPS 2017).

Memory: per experience, the last ``patterns_per_experience`` training samples seen, as in the
paper and its code (a ring buffer filled during training: ``after_step`` appends the samples of
the minibatch that belong to the experience being trained, e = current, and keeps the newest).
GEM keeps these memories itself, not in the run's buffer: raw samples in their compact dtype,
at most ``patterns_per_experience`` × experiences of them, checkpointed with the component.

``after_backward``: for each earlier experience k, g_k = the gradient of the cross-entropy on its
memory at the current parameters (one forward and backward per earlier experience, the model in
its training mode). If the current gradient g (``p.grad``: the whole loss) has ⟨g, g_k⟩ < 0 for
some k, it is replaced by the solution of the paper's quadratic program

    g̃ = argmin_z ½‖z − g‖²  subject to  ⟨z, g_k⟩ ≥ 0 for every earlier k,

through its dual  min_{v ≥ γ} ½ vᵀ(G Gᵀ)v + gᵀGᵀv,  g̃ = g + Gᵀv  (G: the k × P matrix of
memory gradients, γ = ``memory_strength``). The bound v ≥ γ is how the authors' code (and
Avalanche) realise the paper's "small constant γ added to v*" that favours backward transfer;
with it g̃ is the projection of g + γ Σ_k g_k onto the allowed cone, so every constraint still
holds. The k × k dual is solved exactly, in float64 on the CPU, as the non-negative least-squares
problem min_{u ≥ 0} ‖Gᵀu + g + γ Σ_k g_k‖² by the Lawson–Hanson active-set method: finite, it stops
only when the KKT conditions hold, and it handles linearly dependent memory gradients, so the
εI that the authors add to GGᵀ for quadprog is not needed. g̃ is written back into ``p.grad``.

Works in every scenario (the paper evaluates one head per task; class- and domain-incremental
streams work the same way, the constraint being per experience). State: the memories.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.components import RunState

FIELDS = ("x", "y", "t", "e")
KKT_TOL = 1e-10  # relative: ⟨g_k, g̃⟩ ≥ −KKT_TOL · ‖g_k‖ ‖g + γ Σ g_k‖ at the solution


def gem_project(g: Tensor, G: Tensor, margin: float = 0.0) -> Tensor:
    """GEM's update direction for gradient ``g`` (P,) and memory gradients ``G`` (k, P): ``g``
    itself (the same tensor) if ⟨g, g_k⟩ ≥ 0 for every row, else the closest vector to
    ``g + margin · Σ_k g_k`` with ⟨g̃, g_k⟩ ≥ 0 for every row. Computed in float64, returned in
    ``g``'s dtype."""
    if bool(((G @ g) >= 0).all()):
        return g
    g64, G64 = g.double(), G.double()
    shifted = g64 + margin * G64.sum(0)
    Q = (G64 @ G64.T).cpu()
    c = (G64 @ shifted).cpu()
    tol = KKT_TOL * G64.norm(dim=1).cpu() * shifted.norm().cpu()
    u = nnls_gram(Q, c, tol)
    return (shifted + G64.T @ u.to(G64.device)).to(g.dtype)


def nnls_gram(Q: Tensor, c: Tensor, tol: Tensor) -> Tensor:
    """argmin_{u ≥ 0} ½ uᵀQu + cᵀu for Q = AAᵀ positive semi-definite, i.e. non-negative least
    squares in Gram form, by the Lawson–Hanson active-set method (1974), in float64. Returns u with
    u ≥ 0, w = −(Qu + c) ≤ ``tol`` everywhere and w = 0 (to rounding) where u > 0: the KKT
    conditions, checked at every outer iteration. Raises if they are not reached in 10k + 10
    outer iterations (only possible through numerical cycling)."""
    Q, c, tol = Q.double().cpu(), c.double().cpu(), tol.double().cpu()
    k = c.shape[0]
    u = torch.zeros(k, dtype=torch.float64)
    support = torch.zeros(k, dtype=torch.bool)
    for _ in range(10 * k + 10):
        w = -(Q @ u + c)
        free = ~support & (w > tol)
        if not bool(free.any()):
            return u
        support[torch.where(free, w, -math.inf).argmax()] = True
        while True:  # least squares on the support; step back while it leaves the orthant
            idx = support.nonzero().squeeze(1)
            z = torch.zeros(k, dtype=torch.float64)
            if len(idx):  # SVD-based: minimum-norm solution if the memory gradients are dependent
                sol = torch.linalg.lstsq(Q[idx][:, idx], -c[idx, None], driver="gelsd")
                z[idx] = sol.solution[:, 0]
            if bool((z[idx] > 0).all()):
                u = z
                break
            out = idx[z[idx] <= 0]
            gap = u[out] - z[out]  # ≥ 0; 0 only where u = z = 0 (no step possible)
            ratios = torch.where(gap > 0, u[out] / gap.clamp(min=1e-300), 0.0)
            i = int(ratios.argmin())
            u = u + ratios[i] * (z - u)
            u[out[i]] = 0.0
            support &= u > 0
            u[~support] = 0.0
    raise RuntimeError(
        f"GEM: the Lawson–Hanson solver did not reach the KKT conditions of the {k}×{k} dual "
        "problem (numerical cycling); please report this with the run's config"
    )


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


class GEM:
    def __init__(self, patterns_per_experience: int = 256, memory_strength: float = 0.5):
        m = patterns_per_experience
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"GEM patterns_per_experience={m!r} must be an integer ≥ 1")
        ok = isinstance(memory_strength, int | float) and not isinstance(memory_strength, bool)
        if not ok or not math.isfinite(memory_strength) or memory_strength < 0:
            raise ValueError(f"GEM memory_strength={memory_strength!r} must be a finite number ≥ 0")
        self.patterns_per_experience, self.memory_strength = m, float(memory_strength)
        self.memory: dict[int, dict[str, Tensor]] = {}  # experience → raw samples

    def after_backward(self, state: RunState) -> None:
        past = [k for k in sorted(self.memory) if k < state.experience]
        if not past:
            return
        params = [p for p in state.model.parameters() if p.requires_grad]
        used = [p.grad is not None for p in params]
        g = flat_grad([p.grad for p in params], params)
        rows = []
        for k in past:
            m = self.memory[k]
            x = state.model_input(m["x"], m["e"])
            with state.autocast():
                loss = F.cross_entropy(state.model(x, m["t"]), m["y"])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            rows.append(flat_grad(list(grads), params))
            used = [u or gk is not None for u, gk in zip(used, grads, strict=True)]
        new = gem_project(g, torch.stack(rows), self.memory_strength)
        if new is not g:
            write_grad(new, params, used)

    @torch.no_grad()
    def after_step(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> None:
        new = batch.subset(batch.e == state.experience)
        old = self.memory.get(state.experience)
        keep = -self.patterns_per_experience
        self.memory[state.experience] = {
            f: (getattr(new, f) if old is None else torch.cat([old[f], getattr(new, f)]))[keep:]
            for f in FIELDS
        }

    def forget(self, state: RunState, experiences: list[int]) -> None:
        """Continual unlearning: the forgotten experiences' samples leave the memory."""
        from clrun.unlearning import without_experiences

        kept = {k: without_experiences(m, experiences) for k, m in self.memory.items()}
        self.memory = {k: m for k, m in kept.items() if len(m["y"])}

    def state_dict(self) -> dict:
        return {"memory": [[k, dict(m)] for k, m in sorted(self.memory.items())]}

    def load_state_dict(self, state: dict) -> None:
        self.memory = {int(k): dict(m) for k, m in state["memory"]}
