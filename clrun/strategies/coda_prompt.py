"""CODA-Prompt (Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for
Rehearsal-Free Continual Learning", CVPR 2023).

- ``train_data``: checks the run (class-incremental, a timm ViT); remembers the experience's
  classes.
- ``pre_update``: on the first experience, attaches the prompt components
  (:mod:`clrun.models.prompts` kind ``coda_prompt``: ``pool`` components of ``length`` tokens
  with a key and an attention vector each, in blocks ``layers``, split evenly over the
  experiences); every experience: its components are initialised by Gram-Schmidt against the
  earlier ones and become the only trainable ones (the earlier ones are frozen: no gradient),
  and a fresh optimiser (the authors' new optimiser per task). The model's forward pass (the
  runner's) prefixes the attention of those blocks with Σ_m cos(q ⊙ A_m, K_m) P_m, q the frozen
  ViT's [CLS] embedding; the current components and the head train, the ViT stays frozen.
- ``loss``: cross-entropy over the experience's classes only (the authors' learner masks the
  logits of the past classes; later classes have no units yet).
- ``penalty``: ``ortho`` × the orthogonality penalty of keys, attention vectors and components
  in use (the paper's regulariser; the authors' published configs set its weight to 0).

Evaluation: the model's own forward in eval mode, with the components of every experience
trained so far. Where the paper is silent we follow the authors' code (GT-RIPL/CODA-Prompt
``models/zoo.py``, ``configs/*_prompt.yaml``) and LAMDA-PILOT's version of it
(``backbone/prompt.py`` ``CodaPrompt``, with Gram-Schmidt of the new components at every task,
``exps/coda_prompt.json``): the first half of a prompt's tokens prefixes the keys, the second half
the values; the [CLS] output goes to the head. Class-incremental only; a timm ViT only. No state
of its own: the components (and the experience being trained) are in the model.
"""

from __future__ import annotations

from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import int_at_least, number_at_least, require
from clrun.components import RunState
from clrun.strategies.ptm import (
    check_class_il,
    experience_cross_entropy,
    prompt_aux,
    start_prompts,
)


class CODAPrompt:
    kind = "coda_prompt"

    def __init__(
        self,
        pool: int = 100,
        length: int = 8,
        layers: list[int] | tuple[int, ...] = (0, 1, 2, 3, 4),
        ortho: float = 0.0,
    ):
        require("CODA-Prompt pool", pool, int_at_least(1))
        require("CODA-Prompt length", length, int_at_least(2))
        require("CODA-Prompt ortho", ortho, number_at_least(0))
        self.options = {"pool": pool, "length": length, "layers": [int(i) for i in layers]}
        self.ortho = ortho
        self._classes: Tensor | None = None

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        check_class_il(state, "CODA-Prompt")
        self._classes = exp.y.new_tensor(exp.classes)
        return exp

    def pre_update(self, state: RunState, exp: Experience) -> None:
        tasks = len(state.benchmark.train_stream)
        start_prompts(state, exp, self.kind, {"tasks": tasks, **self.options})

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        return experience_cross_entropy(out, batch.y, self._classes)

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor | None:
        aux = prompt_aux(state, self.kind)
        return None if aux is None or self.ortho == 0 else self.ortho * aux
