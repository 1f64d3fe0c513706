"""Experience replay (ER; Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning").

``replay``: each training minibatch is concatenated with ``batch_size`` samples drawn from the
buffer (default: as many as the minibatch has): uniformly, or with ``balance`` = class | task |
experience an equal share per group, small groups oversampled. Samples are offered to the buffer,
whose policy (``buffer=reservoir`` / ``class_balanced``, with ``buffer.selection`` random | herding
| closest_to_center) decides what stays; the ranked selections get the model's L2-normalised
backbone features (:func:`backbone_features`). When (``buffer_update``):

- ``experience`` (default): ``post_update`` offers the whole experience once it is trained, so an
  experience replays only earlier ones;
- ``step``: ``after_step`` offers each incoming minibatch (raw, not the replayed samples) right
  after the optimiser step, the episodic memory of Chaudhry et al. 2019 and the ER of the DER
  authors' code: the current experience is replayed too, from its second step on.

Works in every scenario. The buffer's own state is checkpointed by the runner.

How the new and the replayed samples are weighted (``weighting``), with c = 1, 2, ... the
experience being trained:

- ``batch`` (default): one cross-entropy over the joined minibatch, every sample alike (with as
  many replayed samples as new ones, ½ each).
- ``context``: loss = (1/c) · cross-entropy of the new samples + (1 − 1/c) · cross-entropy of the
  replayed ones, each a mean over its own samples: van de Ven, Tuytelaars & Tolias 2022's
  weighting ("the loss on the current data weighted by the relative importance 1/c of the new
  context"). Replay then provides the runner's ``loss`` hook, so do not list it with another
  component that provides one (ER-ACE, iCaRL, X-DER, LwF with ``weighting=context``).

c counts original experiences (``benchmark.origin``), as LwF's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience, concat
from clrun.buffers import Buffer, FeatureFn, check_balance
from clrun.components import RunState


def piece(samples: Experience, start: int, stop: int) -> Experience:
    """Samples ``start:stop`` (a view, no copy)."""
    s = slice(start, stop)
    return Experience(samples.index, samples.x[s], samples.y[s], samples.t[s], samples.e[s])


def model_input(state: RunState, samples: Experience, train: bool = False) -> Tensor:
    """Raw samples → the model's input, as the runner prepares a minibatch
    (:meth:`RunState.model_input`)."""
    return state.model_input(samples.x, samples.e, train=train)


def backbone_features(state: RunState, batch_size: int = 256) -> FeatureFn:
    """A feature function for buffer selection and nearest-mean classifiers: raw samples →
    L2-normalised features of ``state.model.backbone`` (eval mode, no gradient, batched), as
    iCaRL computes them."""

    def features(samples: Experience) -> Tensor:
        model = state.model
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(samples), batch_size):
                x = model_input(state, piece(samples, i, i + batch_size))
                out.append(F.normalize(model.backbone(x).flatten(1).float(), dim=1))
        model.train(was_training)
        return torch.cat(out)

    return features


def buffer_features(buffer: Buffer, state: RunState) -> FeatureFn | None:
    """The feature function a buffer's selection needs, or None."""
    return backbone_features(state) if getattr(buffer, "needs_features", False) else None


WEIGHTINGS = ("batch", "context")
UPDATES = ("experience", "step")


class Replay:
    def __init__(
        self,
        buffer: Buffer | None,
        batch_size: int | None = None,
        balance: str = "none",
        weighting: str = "batch",
        buffer_update: str = "experience",
    ):
        if buffer is None:
            raise ValueError(
                "this strategy replays samples and needs a buffer: "
                "choose buffer=reservoir or buffer=class_balanced"
            )
        if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) < 1):
            raise ValueError(f"batch_size={batch_size!r} must be null or an integer ≥ 1")
        self.buffer, self.batch_size = buffer, batch_size
        self.balance = check_balance(balance, "balance")
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"replay weighting={weighting!r} is not one of {', '.join(WEIGHTINGS)}"
            )
        self.weighting = weighting
        if weighting == "context":  # only then does replay provide the classification loss
            self.loss = self._context_loss
        if buffer_update not in UPDATES:
            raise ValueError(
                f"replay buffer_update={buffer_update!r} is not one of {', '.join(UPDATES)}"
            )
        self.buffer_update = buffer_update
        self._n_new = 0  # new samples at the head of the current minibatch

    def replay(self, state: RunState, batch: Experience) -> Experience:
        self._n_new = len(batch)
        if len(self.buffer) == 0:
            return batch
        n = self.batch_size or len(batch)
        # a buffer class of the user's own may not take ``balance``: pass it only when asked for
        balanced = self.balance != "none"
        memory = self.buffer.sample(n, self.balance) if balanced else self.buffer.sample(n)
        return concat([batch, memory], batch.index)

    def _context_loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        n = self._n_new or len(batch)
        loss = F.cross_entropy(out[:n], batch.y[:n])
        if len(batch) == n:  # nothing replayed (the first experience): the new samples alone
            return loss
        c = state.benchmark.origin(state.experience) + 1
        return loss / c + (1 - 1 / c) * F.cross_entropy(out[n:], batch.y[n:])

    def after_step(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> None:
        if self.buffer_update == "step":
            self._offer(state, piece(batch, 0, self._n_new or len(batch)))

    def post_update(self, state: RunState, exp: Experience) -> None:
        if self.buffer_update == "experience":
            self._offer(state, exp)

    def _offer(self, state: RunState, samples: Experience) -> None:
        features = buffer_features(self.buffer, state)
        if features is None:
            self.buffer.update(samples)
        else:
            self.buffer.update(samples, features=features)
