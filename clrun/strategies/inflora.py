"""InfLoRA: interference-free low-rank adaptation (Liang & Li, "InfLoRA: Interference-Free
Low-Rank Adaptation for Continual Learning", CVPR 2024).

Each experience t gets its own low-rank branch ΔW_t = A_t B_t on the key and value projections
of every attention block of the frozen pre-trained ViT (:mod:`clrun.models.lora`, kind ``lora``
with a fixed ``down`` = B_t and a trained ``up`` = A_t, attached as ``inflora<t>``). B_t
(rank × dim) is designed before training so that the branch only changes the weights along input
directions orthogonal to the old experiences' inputs: fine-tuning A_t is then fine-tuning W inside
span(B_t), and ΔW_t x ≈ 0 for every input x of an old experience (the paper's "interference-free").

- ``pre_update`` (before experience t): one pass of the experience's training data through the
  model as it is (the branches 0..t−1) gives each block's input covariance C = Σ xxᵀ over every
  token; it is projected away from the old inputs' subspace (DualGPM's representation: C − PPᵀC
  with P a basis of that subspace, or QQᵀC with Q a basis of its orthogonal complement, whichever
  basis is smaller), and B_t is the top ``rank`` left singular vectors of the result, divided by
  √3 (the authors' scaling), the same for k and v. The earlier branches are frozen (they stay in
  the forward pass: the model is W + Σ_{j≤t} A_j B_j); the optimiser starts afresh, as the
  authors build a new Adam for every task.
- ``loss``: cross-entropy over the experience's classes only (the authors' per-task classifier:
  the old classes' units get no gradient, and with a fresh optimiser and no weight decay they do
  not move).
- ``post_update`` (after experience t): branch t is frozen; a second pass (now through branch t)
  gives the covariance of the experience's inputs, which extends the stored subspace of each block
  by DualGPM with the threshold ε_t = ``threshold_first`` + (``threshold_last`` −
  ``threshold_first``) · t / T (T experiences): remove-representation P grows by the fewest top
  singular vectors of the projected covariance that bring the captured energy to ε_t;
  retain-representation Q loses as many; P is swapped for its complement once it passes half the
  dimension.
- Evaluation: the model's own forward pass, every branch active, the head over all classes seen
  (the authors' ``interface``); task-IL accuracy from the same logits.

Where the paper is silent this follows the authors' code (github.com/liangyanshuo/InfLoRA):
``methods/inflora.py`` (``_train``: the covariance pass, the projection, B = U[:, :r]ᵀ/√3, only
``lora_B``/classifier trained; ``update_DualGPM``: the thresholds and both representations),
``models/vit_inflora.py`` (``Attention_LoRA``: branches on k and v from the input of ``qkv``,
summed over tasks), ``models/sinet_inflora.py`` (one classifier per task, concatenated at
evaluation). One departure: when the first experience's subspace already covers half the dimension
their code stores that subspace under the complement's label (and then fails an assertion); here
the complement is stored, as the rest of their code reads it. Not included: InfLoRA-b5 (branches
shared by groups of 5 tasks), InfLoRA+CA (classifier alignment), and the KMeans keys their code
computes but never uses for InfLoRA. Class- or task-incremental; a timm ViT with fused ``qkv``.
State: the subspace basis of every block and which representation it is; B_t and A_t are in the
model (``peft.inflora<t>``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import int_at_least, number_in, require
from clrun.components import RunState
from clrun.errors import ConfigError
from clrun.models import peft
from clrun.models.lora import input_covariance
from clrun.strategies.ptm import experience_cross_entropy
from clrun.strategies.utils import model_input, piece


def design_down(cov: Tensor, basis: Tensor | None, retain: bool, rank: int) -> Tensor:
    """B_t (rank × dim): the top ``rank`` left singular vectors of the covariance ``cov`` with
    the old inputs' subspace projected out (``basis`` spans that subspace, or with ``retain`` its
    complement), over √3."""
    if basis is not None:
        inside = basis @ (basis.T @ cov)
        cov = inside if retain else cov - inside
    u = torch.linalg.svd(cov, full_matrices=False)[0]
    return u[:, :rank].T / math.sqrt(3)


def update_subspace(
    cov: Tensor, basis: Tensor | None, retain: bool, threshold: float
) -> tuple[Tensor, bool]:
    """DualGPM's update of one block's subspace with an experience's input covariance (the
    authors' ``update_DualGPM``). Returns (basis, retain): a basis of the old inputs' subspace
    (remove-representation) or, with ``retain``, of its orthogonal complement."""
    dim = cov.shape[0]
    u, s = torch.linalg.svd(cov, full_matrices=False)[:2]
    energy = s**2
    total = energy.sum()
    if basis is None:  # the first experience: the top directions holding `threshold` energy
        k = max(int((torch.cumsum(energy / total, 0) < threshold).sum()), 1)
        if k < dim / 2:
            return u[:, :k], False
        return u[:, k:], True
    inside = basis @ (basis.T @ cov)
    projected = inside if retain else cov - inside
    u, s = torch.linalg.svd(projected, full_matrices=False)[:2]
    ratio = (s**2 / total).tolist()
    if not retain:
        # the energy the old subspace already holds; add directions until it reaches threshold
        held = float((total - (s**2).sum()) / total)
        r = 0
        while r < len(ratio) and held < threshold:
            held, r = held + ratio[r], r + 1
        if r:
            basis = torch.cat([basis, u[:, :r]], dim=1)[:, :dim]
    else:
        # the energy in the free space; take directions from it while it is ≥ 1 − threshold
        free = float((s**2).sum() / total)
        r = 0
        while r < min(len(ratio), basis.shape[1]) and free >= 1 - threshold:
            free, r = free - ratio[r], r + 1
        if r:
            rest = basis - u[:, :r] @ (u[:, :r].T @ basis)
            basis = torch.linalg.svd(rest)[0][:, : basis.shape[1] - r]
    if not retain and basis.shape[1] > dim / 2:  # keep the smaller of the two bases
        basis, retain = torch.linalg.svd(basis)[0][:, basis.shape[1] :], True
    return basis, retain


class InfLoRA:
    def __init__(
        self,
        rank: int = 10,
        threshold_first: float = 0.95,
        threshold_last: float = 1.0,
        batch_size: int = 256,
    ):
        require("InfLoRA rank", rank, int_at_least(1))
        require("InfLoRA threshold_first", threshold_first, number_in(0, 1, open_lo=True))
        require("InfLoRA threshold_last", threshold_last, number_in(0, 1, open_lo=True))
        require("InfLoRA batch_size", batch_size, int_at_least(1))
        self.rank = rank
        self.threshold_first, self.threshold_last = threshold_first, threshold_last
        self.batch_size = batch_size
        self.bases: list[Tensor] | None = None  # per block: (dim, k) float64
        self.retain: list[bool] | None = None  # per block: the basis spans the complement
        self._classes: Tensor | None = None

    def train_data(self, state: RunState, exp: Experience) -> Experience:
        scenario = state.benchmark.scenario
        if scenario not in ("class", "task"):
            raise ConfigError(
                f"InfLoRA is class- or task-incremental: benchmark.scenario={scenario} is not "
                "supported; use benchmark.scenario=class or task"
            )
        if getattr(state.benchmark, "train_origin", None) is not None:
            raise ConfigError(
                "InfLoRA designs its subspace on whole experiences: "
                "benchmark.online=true is not supported"
            )
        peft.find_vit(state.model, "InfLoRA")
        self._classes = torch.tensor(exp.classes, device=state.device)
        return exp

    def threshold(self, state: RunState, t: int) -> float:
        """ε_t, rising linearly from ``threshold_first`` at t = 0 towards ``threshold_last``."""
        n = len(state.benchmark.train_stream)
        return self.threshold_first + (self.threshold_last - self.threshold_first) * t / n

    def covariance(self, state: RunState, exp: Experience) -> list[Tensor]:
        """Σ xxᵀ of every block's qkv input over the experience's training data (the training
        preparation, as the authors' pass over their train loader; eval mode, no gradient)."""
        model = state.model
        vit = peft.find_vit(model, "InfLoRA")
        was_training = model.training
        model.eval()

        def forward() -> None:
            with torch.no_grad(), state.autocast():
                for i in range(0, len(exp), self.batch_size):
                    x = model_input(state, piece(exp, i, i + self.batch_size), train=True)
                    model(x, exp.t[i : i + self.batch_size])

        try:
            return input_covariance(vit, forward)
        finally:
            model.train(was_training)

    def pre_update(self, state: RunState, exp: Experience) -> None:
        name = f"inflora{exp.index}"
        current = peft.attachments(state.model)
        if name in current:
            return
        for old in current.values():
            old.set_trainable(False)
        covs = self.covariance(state, exp)
        lora = peft.attach(state.model, "lora", name, rank=self.rank, targets="kv", fixed_down=True)
        with torch.no_grad():
            for i, cov in enumerate(covs):
                basis = None if self.bases is None else self.bases[i].to(cov)
                retain = False if self.retain is None else self.retain[i]
                down = design_down(cov, basis, retain, self.rank)
                lora.down[i].copy_(down.to(lora.down.dtype).expand_as(lora.down[i]))
        state.reset_optimizer = True  # a fresh optimiser per experience, as the authors'

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        return experience_cross_entropy(out, batch.y, self._classes)

    def post_update(self, state: RunState, exp: Experience) -> None:
        peft.attachments(state.model)[f"inflora{exp.index}"].set_trainable(False)
        covs = self.covariance(state, exp)
        eps = self.threshold(state, exp.index)
        bases, retain = [], []
        for i, cov in enumerate(covs):
            basis = None if self.bases is None else self.bases[i].to(cov)
            was = False if self.retain is None else self.retain[i]
            b, r = update_subspace(cov, basis, was, eps)
            bases.append(b)
            retain.append(r)
        self.bases, self.retain = bases, retain

    def state_dict(self) -> dict:
        return {"bases": self.bases, "retain": self.retain}

    def load_state_dict(self, state: dict) -> None:
        self.bases = state["bases"]
        self.retain = None if state["retain"] is None else [bool(r) for r in state["retain"]]
