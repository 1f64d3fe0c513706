"""Upper-bound baselines that change what each experience trains on (hook ``train_data``).

- :class:`Cumulative`: at experience i, train on the union of experiences 0..i.
- :class:`Joint`: train once, at the first experience, on the union of all experiences; later
  experiences train on nothing, so every row of the accuracy matrix is still written.

Both work in every scenario. Continual unlearning: :class:`Cumulative` leaves forgotten
experiences out of every later union (its state: the forgotten experiences); :class:`Joint` has
trained on everything at once and cannot unlearn one experience.
"""

from __future__ import annotations

import torch

from clrun.benchmarks import Experience, concat
from clrun.components import RunState


class Cumulative:
    def __init__(self) -> None:
        self.forgotten: list[int] = []

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        union = concat(state.benchmark.train_stream[: exp.index + 1], exp.index)
        if not self.forgotten:
            return union
        gone = torch.isin(union.e, torch.tensor(self.forgotten, device=union.e.device))
        return union.subset(torch.nonzero(~gone).squeeze(1))

    def forget(self, state: RunState, experiences: list[int]) -> None:
        self.forgotten = sorted(set(self.forgotten) | set(experiences))

    def state_dict(self) -> dict:
        return {"forgotten": list(self.forgotten)}

    def load_state_dict(self, state: dict) -> None:
        self.forgotten = list(state["forgotten"])


class Joint:
    def train_data(self, state: RunState, exp: Experience) -> Experience:
        if exp.index == 0:
            return concat(state.benchmark.train_stream, exp.index)
        return exp.subset(torch.zeros(0, dtype=torch.long, device=exp.y.device))
