"""APER (formerly ADAM): adapt a pre-trained model once, then classify with prototypes (Zhou et
al., "Revisiting Class-Incremental Learning with Pre-Trained Models: Generalizability and
Adaptivity are All You Need", IJCV 2024).

- ``pre_update`` of the first experience: attach the parameter-efficient module chosen by
  ``adapter`` (:mod:`clrun.models.peft`: adapter | ssf | vpt_shallow | vpt_deep | finetune) to the
  model's ViT. The ViT's pre-trained weights stay frozen (``finetune``: a frozen copy of them is
  kept here and the ViT itself trains). The runner then trains the attached module and the head
  on the first experience with its loss (cross-entropy) and optimiser.
- ``post_update``: after the first experience the attachment (and a fine-tuned ViT) is frozen for
  good. For every experience, the class means of the concatenated embedding [pre-trained ;
  adapted] of its training samples (eval mode, no augmentation) become its classes' prototypes.
- ``train_data``: an empty experience after the first one: no gradient step is taken again.
- ``predict``: cosine similarity of a sample's concatenated embedding to every prototype (the
  paper's prototype classifier; classes not seen yet are masked). Before the first experience
  ends, the model's own logits.

Differences from the authors' code (LAMDA-PILOT ``models/aper_*.py``): the head trained with the
adaptation is the model's head (``model.head``), not PILOT's cosine classifier with a learned
scale; it is discarded afterwards in both. Class-incremental only; a timm ViT only.
State: the prototypes (sums and counts), whether the adaptation is done, the frozen copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import one_of, require
from clrun.components import RunState
from clrun.models import peft
from clrun.strategies.ptm import check_class_il, class_sums, embed
from clrun.strategies.simplecil import prototype_logits
from clrun.strategies.utils import frozen_copy

NAME = "aper"  # the attachment's name in model.peft
# every kind of clrun.models.peft but the prompt pools (l2p, dualprompt, coda_prompt), which choose
# prompts per input and need their method's per-experience steps
ADAPTERS = peft.ADAPTERS


class APER:
    def __init__(self, adapter: str = "adapter", options: dict | None = None):
        require("APER adapter", adapter, one_of(ADAPTERS))
        self.adapter = adapter
        self.options = dict(options or {})  # the kind's options (peft.KINDS), e.g. width
        peft.check_options(adapter, self.options)
        self.adapted = False  # the first experience has been trained on
        self.sums: Tensor | None = None  # (n_classes, 2D) sums of concatenated embeddings
        self.counts: Tensor | None = None  # (n_classes,)
        self.pretrained: torch.nn.Module | None = None  # finetune: the frozen pre-trained ViT
        self._saved_pretrained: dict | None = None

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        check_class_il(state, "APER")
        if not self.adapted:
            return exp
        return exp.subset(torch.zeros(0, dtype=torch.long, device=exp.y.device))

    def pre_update(self, state: RunState, exp: Experience) -> None:
        if self.adapted or NAME in peft.attachments(state.model):
            return
        if self.adapter == "finetune":
            self.pretrained = frozen_copy(state.model.backbone)
        peft.attach(state.model, self.adapter, NAME, **self.options)

    def post_update(self, state: RunState, exp: Experience) -> None:
        if not self.adapted:
            peft.attachments(state.model)[NAME].set_trainable(False)
            self.adapted = True
        n = state.benchmark.n_classes
        sums, counts = class_sums(embed(state, exp, lambda x: self.features(state, x)), exp.y, n)
        if self.sums is None:
            self.sums, self.counts = sums, counts
        else:
            self.sums, self.counts = self.sums + sums, self.counts + counts

    def features(self, state: RunState, x: Tensor) -> Tensor:
        """[pre-trained embedding ; adapted embedding] of model inputs ``x``."""
        backbone = state.model.backbone
        with peft.only(state.model, (NAME,)):
            adapted = backbone(x)
        if self.adapter == "finetune":
            return torch.cat([self._pretrained(state)(x), adapted], dim=1)
        with peft.only(state.model, ()):
            pretrained = backbone(x)
        return torch.cat([pretrained, adapted], dim=1)

    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        if self.sums is None:
            return state.model(x, t)
        prototypes = self.sums / self.counts.clamp(min=1).unsqueeze(1)
        f = self.features(state, x).float()
        return prototype_logits(f, prototypes.float(), self.counts > 0, "cosine")

    def _pretrained(self, state: RunState) -> torch.nn.Module:
        if self._saved_pretrained is not None:
            # resumed: the model's backbone gives the structure (finetune attaches no hooks)
            self.pretrained = frozen_copy(state.model.backbone, self._saved_pretrained)
            self._saved_pretrained = None
        return self.pretrained

    def state_dict(self) -> dict:
        pretrained = self._saved_pretrained
        if self.pretrained is not None:
            pretrained = self.pretrained.state_dict()
        return {
            "adapted": self.adapted,
            "sums": self.sums,
            "counts": self.counts,
            "pretrained": pretrained,
        }

    def load_state_dict(self, state: dict) -> None:
        self.adapted = bool(state["adapted"])
        self.sums, self.counts = state["sums"], state["counts"]
        self.pretrained, self._saved_pretrained = None, state["pretrained"]
