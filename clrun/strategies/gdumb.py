"""GDumb (Prabhu, Torr & Dokania, ECCV 2020, "GDumb: A Simple Approach that Questions Our
Progress in Continual Learning"): a greedy class-balanced sampler and a learner trained from
scratch on the memory alone.

- ``train_data``: the experience's samples, in a random order drawn with the component's seed
  (the order a stream would present them), go through the paper's greedy sampler (its
  Algorithm 1): a sample of class y is stored if its class holds fewer than
  ``memory_size`` / (number of classes seen, y included) samples; when the memory is full, a
  random sample of the largest class (the earliest-seen of equally large ones) makes room. The
  experience then trains on the memory's contents only.
- ``pre_update``: the model goes back to its initial weights (those it had when the run started;
  output units or heads created since then get a fresh initialisation of their layer's own
  kind), and ``state.reset_optimizer`` gives it a fresh optimiser: GDumb retrains from scratch.
- ``after_backward``: the gradient norm is clipped at ``clip_grad_norm`` (10 in the paper's
  code; null: no clipping).

The rest of the paper's learner is the run's configuration, not the method: its SGDR schedule
(``optimizer=sgd`` with momentum 0.9, lr 0.05 → 0.0005, ``lr_schedule=cosine_restarts`` with one
warm-up epoch at lr 0.005), batch size 16, many passes over the memory (``strategy.epochs``; the
paper uses 128-256) and its MLP (``model.batch_norm=true``); the presets
``conf/experiment/prabhu2020_mnist_*`` set all of it. Not included: the optional CutMix
regularisation (used for its CIFAR/SVHN/ImageNet results, not for MNIST). The paper's
class-incremental numbers use no masking, as here; its task-incremental masking is what a
multi-head model does.

Works in every scenario (classes are the labels ``y``; in domain-incremental they repeat across
experiences and the memory stays balanced over them). State: the memory, the initial weights.
Continual unlearning (``forget``): the forgotten experiences' samples leave the memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.buffers import Buffer
from clrun.checks import int_at_least, number_above, optional, require
from clrun.components import RunState


class GDumb:
    def __init__(self, memory_size: int = 500, clip_grad_norm: float | None = 10.0, seed: int = 0):
        require("GDumb memory_size", memory_size, int_at_least(1))
        clip = optional(number_above(0), "null (no clipping)")
        require("GDumb clip_grad_norm", clip_grad_norm, clip)
        self.memory = Buffer(memory_size, seed)
        self.clip_grad_norm = clip_grad_norm
        self.initial: dict[str, Tensor] | None = None
        self.sampled_through = -1  # the last experience that went through the sampler

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        if exp.index > self.sampled_through:  # not again when resuming inside the experience
            self._greedy_sample(exp)
            self.sampled_through = exp.index
        memory = self.memory.samples()
        return Experience(exp.index, memory.x, memory.y, memory.t, memory.e)

    def _greedy_sample(self, exp: Experience) -> None:
        order = torch.randperm(len(exp), generator=self.memory.generator)
        k = self.memory.max_size
        stored = self.memory.data["y"].tolist() if len(self.memory) else []
        members: dict[int, list[int]] = {}  # class → entries: i < len(stored) a stored sample,
        for i, y in enumerate(stored):  # else new sample order[i - len(stored)]
            members.setdefault(y, []).append(i)
        total = len(stored)
        for j, y in enumerate(exp.y[order.to(exp.y.device)].tolist()):
            have = members.setdefault(y, [])
            if len(have) >= k / len(members):
                continue
            if total >= k:
                largest = max(members.values(), key=len)
                largest.pop(int(torch.randint(len(largest), (), generator=self.memory.generator)))
                total -= 1
            have.append(len(stored) + j)
            total += 1
        entries = torch.tensor(sorted(i for m in members.values() for i in m), dtype=torch.long)
        keep = torch.zeros(len(stored), dtype=torch.bool)
        keep[entries[entries < len(stored)]] = True
        new = order[entries[entries >= len(stored)] - len(stored)]
        if len(stored):
            self.memory.remove(keep.to(self.memory.data["y"].device))
        self.memory.extend(exp.subset(new.to(exp.y.device)))

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.initial is None:
            self.initial = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
        reset_to(state.model, self.initial)
        state.reset_optimizer = True

    def forget(self, state: RunState, experiences: list[int]) -> None:
        """Continual unlearning: the forgotten experiences' samples leave the memory. From the next
        experience on, the model is retrained from scratch on a memory without them, so the
        forgetting is exact from then on; until then the unlearning method changes the model."""
        self.memory.purge(experiences)

    def after_backward(self, state: RunState) -> None:
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), self.clip_grad_norm)

    def state_dict(self) -> dict:
        return {
            "memory": self.memory.state_dict(),
            "initial": self.initial,
            "sampled_through": self.sampled_through,
        }

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.initial, self.sampled_through = state["initial"], state["sampled_through"]


@torch.no_grad()
def reset_to(model: torch.nn.Module, initial: dict[str, Tensor]) -> None:
    """Give every parameter and buffer its value in ``initial``; a module with a parameter that
    ``initial`` lacks or has at another shape (a grown head) is re-initialised by its own
    ``reset_parameters()``. Buffers that grew (the class lists of heads) keep their values."""
    fresh = []
    for prefix, module in model.named_modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for name, value in own:
            saved = initial.get(f"{prefix}.{name}" if prefix else name)
            if saved is not None and saved.shape == value.shape:
                value.copy_(saved)
            elif isinstance(value, torch.nn.Parameter) and module not in fresh:
                fresh.append(module)
    for module in fresh:
        if not hasattr(module, "reset_parameters"):
            raise TypeError(
                f"GDumb cannot re-initialise {type(module).__name__} (no reset_parameters)"
            )
        module.reset_parameters()
