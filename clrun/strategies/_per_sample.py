"""Sums over samples of a function of per-sample gradients: the diagonal Fisher of EWC, the
importance of MAS. One place, so that both get the same eval-mode semantics and speed.

Two exact ways to compute them:

- models whose trainable parameters all belong to ``nn.Linear`` layers (the MLPs, with any
  head): the per-sample gradient of a weight is the outer product δ_i a_iᵀ of the layer's output
  gradient and input, so Σ_i (δ_i a_iᵀ)² = (δ²)ᵀ(a²) and Σ_i |δ_i a_iᵀ| = |δ|ᵀ|a|: one backward
  pass per batch, no per-sample gradient is ever materialised (~50× faster on an MLP);
- any other model: ``torch.func.vmap`` over ``grad``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
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
    eval mode (dropout off, batch-norm running statistics). ``loss(out, y)`` returns one loss
    per sample; ``reduce`` is elementwise (``torch.square``, ``torch.abs``, ...)."""
    model = state.model
    was_training = model.training
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = None
    if reduce in (torch.square, torch.abs) and _all_linear(model, params):
        try:
            sums = _sums(state, samples, 4096, lambda x, b, sums: _add_linear(
                model, params, sums, x, b, loss, reduce), params)  # fmt: skip
        except _NotFlat:  # a Linear saw inputs with extra dimensions: use the general way
            sums = None
    if sums is None:
        per_sample = _vmapped(model, params, loss)
        detached = {k: p.detach() for k, p in params.items()}

        def add(x: Tensor, b: Experience, sums: dict) -> None:
            for k, g in per_sample(detached, x, b.y, b.t).items():
                sums[k] += reduce(g).sum(0)

        sums = _sums(state, samples, batch_size, add, params)
    model.train(was_training)
    return sums


def _sums(state: RunState, samples: Experience, step: int, add: Callable, params: dict) -> dict:
    sums = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(0, len(samples), step):
        b = samples.subset(torch.arange(i, min(i + step, len(samples)), device=samples.y.device))
        add(state.benchmark.prepare(b.x, b.e), b, sums)
    return sums


class _NotFlat(Exception):
    pass


def _all_linear(model: nn.Module, params: dict[str, Tensor]) -> bool:
    owned = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    return all(id(p) in owned for p in params.values())


def _vmapped(model: nn.Module, params: dict[str, Tensor], loss: Callable) -> Callable:
    buffers = dict(model.named_buffers())

    def sample_loss(p: dict, x: Tensor, y: Tensor, t: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0), t.unsqueeze(0)))
        return loss(out, y.unsqueeze(0)).sum()

    return vmap(grad(sample_loss), in_dims=(None, 0, 0, 0))


def _add_linear(model, params, sums, x, b, loss, reduce) -> None:
    """One forward/backward of the summed per-sample losses; hooks collect each Linear's input
    a (B, in) and output gradient δ (B, out), exact because samples do not interact in eval."""
    names = {id(p): n for n, p in params.items()}
    inputs: dict[nn.Linear, Tensor] = {}
    grads: dict[nn.Linear, Tensor] = {}
    handles = []

    def capture(m: nn.Module, args: tuple, out: Tensor) -> None:
        inputs[m] = args[0].detach()
        out.register_hook(lambda g: grads.__setitem__(m, g.detach()))

    for m in model.modules():
        if isinstance(m, nn.Linear) and any(id(p) in names for p in m.parameters()):
            handles.append(m.register_forward_hook(capture))
    saved = {k: p.grad for k, p in params.items()}  # the optimiser's, left as they were
    try:
        for p in params.values():
            p.grad = None
        with torch.enable_grad():
            loss(model(x, b.t), b.y).sum().backward(inputs=list(params.values()))
    finally:
        for h in handles:
            h.remove()
    for k, p in params.items():
        p.grad = saved[k]
    for m, a in inputs.items():
        d = grads.get(m)
        if d is None or a.dim() != 2:
            raise _NotFlat
        sums[names[id(m.weight)]] += reduce(d).T @ reduce(a)
        if m.bias is not None and id(m.bias) in names:
            sums[names[id(m.bias)]] += reduce(d).sum(0)
