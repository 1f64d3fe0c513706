"""Upper-bound baselines that change what each experience trains on (hook ``train_data``).

- :class:`Cumulative`: at experience i, train on the union of experiences 0..i.
- :class:`Joint`: train once, at the first experience, on the union of all experiences; later
  experiences train on nothing, so every row of the accuracy matrix is still written.

Both work in every scenario; they keep no state of their own.
"""

from __future__ import annotations

import torch

from clrun.benchmarks import Experience, concat
from clrun.components import RunState


class Cumulative:
    def train_data(self, state: RunState, exp: Experience) -> Experience:
        return concat(state.benchmark.train_stream[: exp.index + 1], exp.index)


class Joint:
    def train_data(self, state: RunState, exp: Experience) -> Experience:
        if exp.index == 0:
            return concat(state.benchmark.train_stream, exp.index)
        return exp.subset(torch.zeros(0, dtype=torch.long, device=exp.y.device))
