"""Sums over samples of a function of per-sample gradients: the diagonal Fisher of EWC, the
importance of MAS. One place, so that both get the same eval-mode semantics and speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from clrun.benchmarks import Experience
from clrun.components import RunState


def sum_per_sample_grads(
    state: RunState,
    samples: Experience,
    loss: Callable[[Tensor, Tensor], Tensor],
    reduce: Callable[[Tensor], Tensor],
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Σ_i reduce(∂ loss(f(x_i), y_i) / ∂θ) for every trainable parameter θ, with the model in
    eval mode (dropout off, batch-norm running statistics), ``batch_size`` samples per vmap."""
    model = state.model
    was_training = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def sample_loss(p: dict, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0), t.unsqueeze(0)))
        return loss(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(0, len(samples), batch_size):  # torch.func ignores an outer no_grad
        b = samples.subset(
            torch.arange(i, min(i + batch_size, len(samples)), device=samples.y.device)
        )
        for k, g in per_sample(params, state.benchmark.prepare(b.x, b.e), b.y, b.t).items():
            sums[k] += reduce(g).sum(0)
    model.train(was_training)
    return sums
