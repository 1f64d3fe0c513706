"""Helpers of the pre-trained-model methods (APER, SLCA, EASE, L2P, DualPrompt, CODA-P):
embeddings of raw samples, class means, cosine prototype logits, the cross-entropy over one
experience's classes, the checks they share (class-incremental, a timm ViT), and the prompt
methods' attachment and auxiliary loss."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun import distributed
from clrun.benchmarks import Experience
from clrun.components import RunState
from clrun.models import peft
from clrun.models.peft import find_vit
from clrun.strategies.utils import model_input, piece

__all__ = [
    "check_class_il",
    "class_sums",
    "embed",
    "experience_cross_entropy",
    "prompt_aux",
    "start_prompts",
]


def check_class_il(state: RunState, method: str) -> None:
    """One-line errors for what these methods do not do: other scenarios, online streams,
    models that are not a timm ViT."""
    from clrun.strategies.utils import require_class_il

    require_class_il(method, state, "fits on whole experiences", one_head=False)
    find_vit(state.model, method)


def embed(
    state: RunState, samples: Experience, fn: Callable[[Tensor], Tensor], batch_size: int = 256
) -> Tensor:
    """``fn(model input)`` for every sample (eval mode, no gradient, no augmentation, float32),
    in batches: the features class means are taken of (the authors compute them with the test
    transform). In a distributed run each process computes its shard and gets all rows."""
    if len(samples) == 0:
        return torch.zeros(0, 0, device=state.device)

    def shard(part: range) -> Tensor:
        model = state.model
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad(), state.autocast():
            for i in range(part.start, part.stop, batch_size):
                x = model_input(state, piece(samples, i, min(i + batch_size, part.stop)))
                out.append(fn(x).float())
        model.train(was_training)
        return torch.cat(out)

    return distributed.cat_sharded(len(samples), shard)


def class_sums(features: Tensor, y: Tensor, n_classes: int) -> tuple[Tensor, Tensor]:
    """(per-class sums of ``features`` (n_classes, D), per-class counts (n_classes,))."""
    sums = features.new_zeros(n_classes, features.shape[1])
    sums.index_add_(0, y, features)
    return sums, torch.bincount(y, minlength=n_classes)


def experience_cross_entropy(out: Tensor, y: Tensor, classes: Tensor) -> Tensor:
    """Cross-entropy over the logits of ``classes`` only (the current experience's): the
    authors' loss of SLCA and EASE, which train the new classes' units alone."""
    pos = torch.full((out.shape[1],), -1, dtype=torch.long, device=out.device)
    pos[classes] = torch.arange(len(classes), device=out.device)
    return F.cross_entropy(out[:, classes], pos[y])


def start_prompts(state: RunState, exp: Experience, kind: str, options: dict) -> peft.Attachment:
    """The prompt attachment of ``kind`` (:mod:`clrun.models.prompts`), attached on the first
    experience, started for experience ``exp`` (its own per-experience step); the optimiser
    starts afresh every experience (the authors' ``reinit_optimizer`` / a new optimiser per
    task)."""
    attached = peft.attachments(state.model)
    prompts = attached.get(kind) or peft.attach(state.model, kind, **options)
    prompts.start(exp.index)
    state.reset_optimizer = True
    return prompts


def prompt_aux(state: RunState, kind: str) -> Tensor | None:
    """The auxiliary loss of the prompt attachment's last training forward (then cleared)."""
    prompts = peft.attachments(state.model)[kind]
    aux, prompts.aux = prompts.aux, None
    return aux
