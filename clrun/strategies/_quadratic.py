"""The quadratic penalty Σ w (θ − θ*)² shared by EWC, SI, MAS and RWalk, for models that grow.

A parameter that grew since its anchor θ* was taken (an incremental head got new units) is
penalised on its old part only; parameters created later have no weight and no penalty.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from clrun.models import old_part


def anchor_of(model: nn.Module) -> dict[str, Tensor]:
    """θ*: a detached copy of every parameter of the model as it is now."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def quadratic(model: nn.Module, weights: dict[str, Tensor], anchor: dict[str, Tensor]) -> Tensor:
    """Σ over the model's parameters of weights · (θ − anchor)², summed in float32 (also under
    bf16 autocast). Differentiable; call it under ``no_grad`` for the value alone."""
    device = next(iter(weights.values())).device
    total = torch.zeros((), dtype=torch.float32, device=device)
    for name, p in model.named_parameters():
        w = weights.get(name)
        if w is not None:
            part = p if p.shape == w.shape else p[old_part(w.shape)]  # no slice op when not grown
            total = total + (w * (part - anchor[name]).pow(2)).sum()
    return total
