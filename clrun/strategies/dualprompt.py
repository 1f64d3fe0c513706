"""DualPrompt (Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual
Learning", ECCV 2022).

- ``train_data``: checks the run (class-incremental, a timm ViT, an E-prompt per experience);
  remembers the experience's classes.
- ``pre_update``: on the first experience, attaches the prompts (:mod:`clrun.models.prompts`
  kind ``dualprompt``): a G-prompt shared by all experiences in blocks ``g_layers`` and one
  E-prompt per experience, with its key, in blocks ``e_layers``, both by prefix tuning of the
  attention; every experience: its E-prompt starts from the previous one (the authors'
  ``shared_prompt_pool``) and a fresh optimiser (``reinit_optimizer``). During training the
  model's forward pass uses the E-prompt of the experience being trained (the paper's
  task-identity-aware training); the G-prompt, the E-prompts, the keys and the head train, the
  ViT stays frozen.
- ``loss``: cross-entropy over the experience's classes only (the authors' ``train_mask``).
- ``penalty``: ``coeff`` × (1 − cos(query, key of the experience)), averaged over the batch
  (the paper's matching loss).

Evaluation: the model's own forward in eval mode; each sample's E-prompt is the one whose key is
closest (cosine) to its query, the frozen ViT's [CLS] embedding. Where the paper is silent we
follow LAMDA-PILOT (``models/dualprompt.py``, ``backbone/vit_dualprompt.py``,
``backbone/prompt.py`` ``EPrompt``, ``exps/dualprompt.json``; the PyTorch port of the authors'
JAX code): prompts and keys uniform in [-1, 1], a prefix of ``length`` key tokens and ``length``
value tokens, the [CLS] output to the head. Unlike that code, evaluation matches keys per sample,
not by the majority over a test batch. Class-incremental only; a timm ViT only. No state of its
own: the prompts (and the experience being trained) are in the model.
"""

from __future__ import annotations

from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import int_at_least, number_at_least, optional, require
from clrun.components import RunState
from clrun.errors import ConfigError
from clrun.strategies.ptm import (
    check_class_il,
    experience_cross_entropy,
    prompt_aux,
    start_prompts,
)


class DualPrompt:
    kind = "dualprompt"

    def __init__(
        self,
        pool: int | None = None,
        length: int = 5,
        g_length: int = 5,
        g_layers: list[int] | tuple[int, ...] = (0, 1),
        e_layers: list[int] | tuple[int, ...] = (2, 3, 4),
        coeff: float = 0.1,
    ):
        require("DualPrompt pool", pool, optional(int_at_least(1), "null (one per experience)"))
        require("DualPrompt length", length, int_at_least(1))
        require("DualPrompt g_length", g_length, int_at_least(1))
        require("DualPrompt coeff", coeff, number_at_least(0))
        self.pool = pool
        self.options = {
            "length": length,
            "g_length": g_length,
            "g_layers": [int(i) for i in g_layers],
            "e_layers": [int(i) for i in e_layers],
        }
        self.coeff = coeff
        self._classes: Tensor | None = None

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        check_class_il(state, "DualPrompt")
        n = len(state.benchmark.train_stream)
        if self.pool is not None and self.pool < n:
            raise ConfigError(
                f"strategy.pool={self.pool}: DualPrompt needs one E-prompt per experience, "
                f"at least {n}"
            )
        self._classes = exp.y.new_tensor(exp.classes)
        return exp

    def pre_update(self, state: RunState, exp: Experience) -> None:
        pool = self.pool or len(state.benchmark.train_stream)
        start_prompts(state, exp, self.kind, {"pool": pool, **self.options})

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        return experience_cross_entropy(out, batch.y, self._classes)

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor | None:
        aux = prompt_aux(state, self.kind)
        return None if aux is None or self.coeff == 0 else self.coeff * aux
