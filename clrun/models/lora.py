"""Low-rank updates of a timm ViT's attention projections: the ``lora`` kind of
:mod:`clrun.models.peft`.

One :class:`LoRA` attachment adds, in every block, ``ΔW = up · down`` to the chosen slices of the
attention's fused ``qkv`` projection (``targets``: any of ``q``, ``k``, ``v``; one pair of
matrices per slice and block), so that the projection of a block input ``x`` becomes
``W x + up · down · x`` for those slices. It is a forward hook on ``blocks.<i>.attn.qkv`` that adds
``x @ (up · down)ᵀ`` to the slice of the output: the ViT's own weights never change, and several
attachments add their updates (InfLoRA's branches of all tasks so far, the authors'
``Attention_LoRA.forward`` summing ``lora_B[t] · lora_A[t]`` over t).

- ``down`` (rank × dim, LoRA's A, InfLoRA's dimensionality-reduction B_t): Kaiming-uniform
  (a = √5) and trained, as in LoRA (Hu et al., ICLR 2022); with ``fixed_down`` it is a buffer
  that a strategy designs (InfLoRA sets it from the inputs' covariance before training) and never
  trained; it is saved with the model either way.
- ``up`` (dim × rank, LoRA's B, InfLoRA's A_t): zero, so the attachment starts as the identity;
  always trained while the attachment is trainable.

``input_covariance`` is the measurement InfLoRA designs ``down`` from: the sum of ``xᵀx`` over
every token of every input to each block's ``qkv``, through the model as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from clrun.errors import ConfigError
from clrun.models.peft import Attachment

SLICES = ("q", "k", "v")  # the order of timm's fused qkv output


def qkv_layers(vit: nn.Module, what: str = "lora") -> list[nn.Linear]:
    """Each block's fused ``attn.qkv`` projection; a one-line error for a ViT without one."""
    layers = []
    for i, blk in enumerate(vit.blocks):
        qkv = getattr(getattr(blk, "attn", None), "qkv", None)
        if not isinstance(qkv, nn.Linear) or qkv.out_features != 3 * qkv.in_features:
            raise ConfigError(
                f"{what}: block {i} of {type(vit).__name__} has no fused attn.qkv linear layer"
            )
        layers.append(qkv)
    return layers


class LoRA(Attachment):
    kind = "lora"

    def __init__(self, vit, rank: int = 10, targets: str = "kv", fixed_down: bool = False):
        super().__init__(vit, rank=rank, targets=targets, fixed_down=fixed_down)
        if not targets or any(t not in SLICES for t in targets) or len(set(targets)) < len(targets):
            raise ConfigError(f"lora targets={targets!r}: letters of 'qkv', each once (e.g. kv)")
        if not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"lora rank={rank!r}: an integer ≥ 1")
        layers = qkv_layers(vit)
        dim = layers[0].in_features
        self.dim, self.rank = dim, rank
        self.targets = targets
        self.fixed_down = bool(fixed_down)
        shape = (len(layers), len(targets))
        down = torch.empty(*shape, rank, dim)
        for i in range(shape[0]):
            for j in range(shape[1]):
                nn.init.kaiming_uniform_(down[i, j], a=math.sqrt(5))
        if self.fixed_down:
            self.register_buffer("down", torch.zeros_like(down))  # the strategy designs it
        else:
            self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(*shape, dim, rank))

    def install(self, vit: nn.Module) -> None:
        for i, qkv in enumerate(qkv_layers(vit)):
            qkv.register_forward_hook(partial(self._add, i))

    def delta(self, block: int) -> Tensor:
        """ΔW of every target slice of ``block``: (n_targets, dim, dim) = up · down."""
        return self.up[block] @ self.down[block]

    def _add(self, block: int, module, args, out: Tensor):
        if not self.active:
            return None
        x = args[0]
        low = torch.einsum("...d,trd->...tr", x, self.down[block].to(x.dtype))
        add = torch.einsum("...tr,tor->...to", low, self.up[block].to(x.dtype))
        parts = list(out.split(self.dim, dim=-1))
        for j, t in enumerate(self.targets):
            s = SLICES.index(t)
            parts[s] = parts[s] + add[..., j, :]
        return torch.cat(parts, dim=-1)


def input_covariance(
    vit: nn.Module, forward: Callable[[], None], covariance: list[Tensor] | None = None
) -> list[Tensor]:
    """Run ``forward`` (batches through the model) and add up ``xᵀx`` (float64, summed over
    every token of every sample) of the input ``x`` of each block's ``attn.qkv`` into
    ``covariance`` (one (dim, dim) matrix per block, zeros when None). Returns it."""
    layers = qkv_layers(vit)
    if covariance is None:
        dim = layers[0].in_features
        device = layers[0].weight.device
        covariance = [torch.zeros(dim, dim, dtype=torch.float64, device=device) for _ in layers]

    def keep(i: int, module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        covariance[i].add_((x.T @ x).double())

    handles = [qkv.register_forward_pre_hook(partial(keep, i)) for i, qkv in enumerate(layers)]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return covariance
