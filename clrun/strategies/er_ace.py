"""ER-ACE: experience replay with the asymmetric cross-entropy (Caccia et al., ICLR 2022, "New
Insights on Reducing Abrupt Representation Change in Online Continual Learning").

- ``replay``: the incoming minibatch is followed by ``batch_size`` buffer samples (default: as
  many as it has; uniform, or group-balanced with ``balance``), as soon as the buffer holds any.
- ``loss`` (replaces the runner's cross-entropy): cross-entropy of the incoming samples over the
  output units of the classes *present in the incoming minibatch* plus the classes never seen so
  far (the other seen classes are masked out), plus the ordinary cross-entropy of the replayed
  samples over all units; each term is a mean over its own samples. This is the authors' code
  (``pclucas14/AML``, ``methods/er_ace.py``, task-free: masking from the first step on); the
  paper writes the incoming term over the "current" classes, which that code takes to be the
  classes of the incoming minibatch. Classes count as seen from the step they first appear in.
- ``after_step``: the incoming samples (raw, not augmented) enter the buffer (reservoir in the
  paper), every step.

Incoming and replayed samples share one forward pass (the authors' code makes two; the same
result for models without batch normalisation). Works in every scenario (with a multi-head model
each sample's units are its task's; in domain-incremental every class is present in most
minibatches, and ER-ACE approaches ER). State: the classes seen so far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience, concat
from clrun.buffers import Buffer, check_balance
from clrun.checks import int_at_least, optional, require
from clrun.components import RunState
from clrun.models import MASKED
from clrun.strategies.utils import offer


class ERACE:
    def __init__(self, buffer: Buffer | None, batch_size: int | None = None, balance: str = "none"):
        if buffer is None:
            raise ValueError(
                "ER-ACE replays samples and needs a buffer: "
                "choose buffer=reservoir (the paper's) or buffer=class_balanced"
            )
        batch = optional(int_at_least(1), "null (= the minibatch's)")
        require("ER-ACE batch_size", batch_size, batch)
        self.buffer, self.batch_size = buffer, batch_size
        self.balance = check_balance(balance, "ER-ACE balance")
        self.seen: Tensor | None = None  # bool per class: seen in an incoming minibatch
        self._n_new = 0

    def replay(self, state: RunState, batch: Experience) -> Experience:
        self._n_new = len(batch)
        if len(self.buffer) == 0:
            return batch
        n = self.batch_size or len(batch)
        return concat([batch, self.buffer.sample(n, self.balance)], batch.index)

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        n = self._n_new or len(batch)
        if self.seen is None:
            self.seen = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
        present = torch.zeros_like(self.seen).index_fill_(0, batch.y[:n], True)
        self.seen |= present
        allowed = present | ~self.seen  # the incoming minibatch's classes and the unseen ones
        loss = F.cross_entropy(out[:n].masked_fill(~allowed, MASKED), batch.y[:n])
        if len(batch) > n:
            loss = loss + F.cross_entropy(out[n:], batch.y[n:])
        return loss

    def after_step(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> None:
        n = self._n_new or len(batch)
        new = batch if n == len(batch) else batch.subset(torch.arange(n, device=batch.y.device))
        offer(self.buffer, state, new)

    def forget(self, state: RunState, experiences: list[int]) -> None:
        """Continual unlearning: classes that only forgotten experiences had count as unseen
        again (the run's buffer has lost their samples already)."""
        from clrun.unlearning import classes_only_in

        gone = sorted(classes_only_in(state, experiences))
        if self.seen is not None and gone:
            self.seen[torch.tensor(gone, device=self.seen.device)] = False

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"]
