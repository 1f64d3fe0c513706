"""Progressive Neural Networks (Rusu et al., "Progressive Neural Networks", arXiv:1606.04671,
2016): one column per task, lateral adapters from every earlier column, earlier columns frozen.

Hooks:

- ``train_data`` (every experience, and again on a resumed run): refuses anything but the task
  scenario with a multi-head model (one line), and freezes the heads of earlier tasks (their
  zero gradients would still move them under momentum or Adam).
- ``pre_update`` (before training on an experience): on the first experience, puts
  :class:`~clrun.models.task_nets.ProgressiveColumns` in place of the model's plain backbone
  (``model=mlp`` or ``model=cnn``; others are refused in one line). The runner then adapts the
  model: the new task label gets its column (column 0 for the first task) with its adapters,
  every earlier column freezes, and the optimiser is rebuilt over the grown model.

At evaluation each sample runs through its task's column (the task label reaches the backbone
through ``CLModel.forward``), so earlier tasks' outputs are exactly those they had when their
column froze. Growth per experience: one column (the backbone's parameters), one adapter per
layer after the first (α: one scalar per earlier column; V: (k·n_{i−1}) → n_{i−1} with bias;
U: n_{i−1} → n_i without bias) and the task's head. Where the paper is silent (no lateral into
the output layer, which is the task's own head; α's initial value) see
:mod:`clrun.models.task_nets`. The component has no state of its own: the columns are the
model's (and its checkpoint's).
"""

from __future__ import annotations

from clrun.benchmarks import Experience
from clrun.components import RunState
from clrun.models.task_nets import ProgressiveColumns
from clrun.strategies.utils import freeze_other_heads, require_task_il

__all__ = ["PNN"]


class PNN:
    """Progressive columns in place of the backbone, one per task label."""

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        require_task_il(state, "pnn")
        freeze_other_heads(state.model, exp.classes_by_task)
        return exp

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if not isinstance(state.model.backbone, ProgressiveColumns):
            state.model.backbone = ProgressiveColumns(state.model.backbone)
