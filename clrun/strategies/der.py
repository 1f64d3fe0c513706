"""Dark Experience Replay, DER and DER++ (Buzzega et al., NeurIPS 2020, "Dark Experience for
General Continual Learning: a Strong, Simple Baseline").

The run's buffer (reservoir in the paper: ``buffer=reservoir``) keeps, with every sample, the
logits the model produced for it when it was stored (the extra buffer field ``logits``, width
``benchmark.n_classes``).

- ``replay``: notes how many samples the incoming minibatch has (DER draws its memory samples
  separately and mixes nothing into the batch; list it before components that do).
- ``penalty``: ``alpha`` · MSE(logits the model now gives ``minibatch_size`` buffer samples
  (default: ``strategy.batch_size``), their stored logits); DER++ (``beta`` > 0) adds ``beta`` ·
  cross-entropy on the labels of a second, independently drawn buffer minibatch. Buffer samples
  get the benchmark's training augmentation, as in the paper. The cross-entropy on the incoming
  minibatch is the runner's.
- ``after_step``: the incoming samples (raw, not augmented) enter the buffer together with the
  logits of this step's forward pass (made before the optimiser step, as in the authors' code).

Logits of output units a growing head did not have yet when a sample was stored (incremental or
multi-head models fill them with ``clrun.models.MASKED``) are left out of the MSE; with a single
head every unit counts, exactly as in the paper. So with ``model.head=incremental`` nothing holds
down the logits that later classes give earlier samples (a single head's stored logits do): expect
less protection in class-incremental learning. ``balance`` (none | class | task | experience)
draws the buffer minibatches group-balanced instead of uniformly (not in the paper).

Works in every scenario. State: none of its own (the buffer, logits included, is checkpointed by
the runner). The buffer cannot be shared with a component that stores samples without logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.buffers import Buffer, check_balance
from clrun.checks import int_at_least, number_at_least, optional, require
from clrun.components import RunState
from clrun.models import MASKED
from clrun.strategies.utils import model_input, offer


class DER:
    def __init__(
        self,
        buffer: Buffer | None,
        alpha: float = 0.3,
        beta: float = 0.0,
        minibatch_size: int | None = None,
        balance: str = "none",
    ):
        if buffer is None:
            raise ValueError(
                "DER replays samples with their logits and needs a buffer: "
                "choose buffer=reservoir (the paper's) or buffer=class_balanced"
            )
        require("DER alpha", alpha, number_at_least(0))
        require("DER beta", beta, number_at_least(0))
        batch = optional(int_at_least(1), "null (= strategy.batch_size)")
        require("DER minibatch_size", minibatch_size, batch)
        self.buffer, self.alpha, self.beta = buffer, float(alpha), float(beta)
        self.minibatch_size = minibatch_size
        self.balance = check_balance(balance, "DER balance")
        self._n_new = 0  # samples of the incoming minibatch, this step

    def replay(self, state: RunState, batch: Experience) -> Experience:
        self._n_new = len(batch)
        return batch

    def _draw(self, state: RunState, n: int) -> tuple[Tensor, Experience, Tensor]:
        idx = self.buffer.sample_index(n, self.balance)
        memory = self.buffer.samples(idx)
        out = state.model(model_input(state, memory, train=True), memory.t)
        return idx, memory, out

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor | None:
        if len(self.buffer) == 0 or (self.alpha == 0 and self.beta == 0):
            return None
        n = self.minibatch_size or state.batch_size
        total = out.new_zeros(())
        if self.alpha > 0:
            idx, _, buf_out = self._draw(state, n)
            total = total + self.alpha * masked_mse(buf_out, self.buffer.get("logits", idx))
        if self.beta > 0:
            _, memory, buf_out = self._draw(state, n)
            total = total + self.beta * F.cross_entropy(buf_out.float(), memory.y)
        return total

    def after_step(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> None:
        n = self._n_new or len(batch)
        new = batch if n == len(batch) else batch.subset(torch.arange(n, device=batch.y.device))
        offer(self.buffer, state, new, logits=out[:n].detach().float())


def masked_mse(out: Tensor, stored: Tensor) -> Tensor:
    """Mean squared error over the stored logits of units that existed at storage time."""
    valid = stored != MASKED
    sq = torch.where(valid, (out.float() - stored).pow(2), 0.0)
    return sq.sum() / valid.sum().clamp(min=1)
