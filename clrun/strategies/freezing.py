"""Components that restrict what gradient training changes: on which experiences
(:class:`TrainOnly`) and which parameters (:class:`FreezeBackbone`).

- :class:`TrainOnly` (``train_data``): experiences ``0 .. first-1`` train as usual; every later
  one trains on nothing (an empty experience: the runner takes no step, ``post_update`` still gets
  the whole experience). ``first=0``: no gradient training at all (SimpleCIL, NCM, RanPAC and
  FeCAM on a pre-trained embedding); ``first=1``: the first-session adaptation of APER, RanPAC
  and FeCAM, after which the model never changes. In an online stream ``first`` counts original
  experiences. List it after the components whose ``train_data`` adds samples (a replay memory):
  it empties whatever it is given.
- :class:`FreezeBackbone` (``train_data``, so a resumed run freezes its rebuilt model too):
  ``model.backbone`` gets no gradients and runs in eval mode (batch-norm statistics and dropout
  as at evaluation), so it stays bit-identical while the head trains: a linear probe with any
  model. Parameters added to the backbone later (adapters) are frozen at the next experience.

Both work in every scenario and have no state beyond their settings.
"""

from __future__ import annotations

import torch
from torch import nn

from clrun.benchmarks import Experience
from clrun.checks import Rule, is_int, require
from clrun.components import RunState

__all__ = ["FreezeBackbone", "TrainOnly"]


class TrainOnly:
    """Gradient training on the first ``first`` experiences only (true = 1, false = 0, so a
    YAML switch such as ``strategy.first_session_training`` can drive it)."""

    def __init__(self, first: int | bool = 0):
        rule = Rule(lambda v: isinstance(v, bool) or (is_int(v) and v >= 0), "true, false or ≥ 0")
        self.first = int(require("TrainOnly first", first, rule))

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        if state.benchmark.origin(exp.index) < self.first:
            return exp
        return exp.subset(torch.zeros(0, dtype=torch.long, device=exp.y.device))


class FreezeBackbone:
    """``model.backbone`` frozen (no gradients, eval mode) from the first experience on."""

    def __init__(self) -> None:
        self._hooked: nn.Module | None = None  # the backbone whose forward we keep in eval mode

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        backbone = state.model.backbone
        backbone.requires_grad_(False)
        if self._hooked is not backbone:
            # the runner puts the whole model in train mode before each experience: switch the
            # backbone back to eval mode as each forward pass starts
            backbone.register_forward_pre_hook(_eval_mode)
            self._hooked = backbone
        return exp


def _eval_mode(module: nn.Module, args: tuple) -> None:
    if module.training:
        module.eval()
