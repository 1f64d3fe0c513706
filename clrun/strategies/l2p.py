"""L2P: Learning to Prompt (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022).

- ``train_data``: checks the run (class-incremental, a timm ViT); remembers the experience's
  classes.
- ``pre_update``: on the first experience, attaches the prompt pool (:mod:`clrun.models.prompts`
  kind ``l2p``: ``pool`` prompts of ``length`` tokens with learnable keys) to the frozen ViT;
  every experience, a fresh optimiser (the authors' ``reinit_optimizer``). The model's forward
  pass (the runner's) then queries the frozen ViT ([CLS]), prepends the ``top_n`` prompts whose
  keys are closest and classifies the mean of the prompt tokens' outputs with the model's head;
  prompts, keys and head train, the ViT stays frozen.
- ``loss``: cross-entropy over the experience's classes only (the authors' ``train_mask``: the
  other classes' logits are masked during training).
- ``penalty``: ``coeff`` × the surrogate loss Σ over the chosen keys of (1 − cos(query, key)),
  averaged over the batch (the paper's key-query matching term).

Evaluation: the model's own forward in eval mode, each sample's top-N prompts by key matching.
Where the paper is silent we follow LAMDA-PILOT (``models/l2p.py``, ``backbone/prompt.py``,
``backbone/vit_l2p.py``, ``exps/l2p.json``; the PyTorch port of the authors' JAX code): keys and
prompts uniform in [-1, 1], ``batchwise_prompt`` (during training every sample of a batch uses
the N prompts chosen most often in it); the prompts take the [CLS] position embedding. Unlike
that code, evaluation chooses per sample (their batch-wise choice at test time makes a sample's
prediction depend on the other samples of its batch). Class-incremental only; a timm ViT only.
No state of its own: the prompts are in the model.
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


class L2P:
    kind = "l2p"

    def __init__(
        self,
        pool: int = 10,
        length: int = 5,
        top_n: int = 5,
        batchwise: bool = True,
        coeff: float = 0.1,
    ):
        require("L2P pool", pool, int_at_least(1))
        require("L2P length", length, int_at_least(1))
        require("L2P top_n", top_n, int_at_least(1))
        require("L2P coeff", coeff, number_at_least(0))
        self.options = {"pool": pool, "length": length, "top_n": top_n, "batchwise": batchwise}
        self.coeff = coeff
        self._classes: Tensor | None = None

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        check_class_il(state, "L2P")
        self._classes = exp.y.new_tensor(exp.classes)
        return exp

    def pre_update(self, state: RunState, exp: Experience) -> None:
        start_prompts(state, exp, self.kind, self.options)

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        return experience_cross_entropy(out, batch.y, self._classes)

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor | None:
        aux = prompt_aux(state, self.kind)
        return None if aux is None or self.coeff == 0 else self.coeff * aux
