"""X-DER, eXtended Dark Experience Replay (Boschini, Bonicelli, Buzzega, Porrello & Calderara,
TPAMI 2022, "Class-Incremental Continual Learning into the eXtended DER-verse"): the full method
with its SupCon-based future preparation, as the paper defines it and its official code
(Mammoth, ``models/xder.py``) implements it.

The output units are split into heads, one per experience (the classes of each experience; X-DER
knows this partition of the label space in advance, like the paper's fixed classes per task). For
the experience being trained, heads are past, present or future. X-DER keeps its own memory of
``memory_size`` samples with their logits.

- ``loss`` (replaces the runner's cross-entropy): cross-entropy of the incoming minibatch over
  the present head's units only.
- ``penalty``: (1) ``alpha`` · MSE between the model's logits on ``minibatch_size`` memory
  samples and their stored logits, all units; (2) ``beta`` · cross-entropy of a second memory
  minibatch over the past heads' units; (3) future-past update, online: each memory sample of a
  past class drawn here (duplicates once) has its stored logits of the present and future heads
  replaced, with probability 1/(times drawn this experience), by the model's current ones, scaled
  down to ``gamma`` × its stored ground-truth logit where their maximum exceeds that logit;
  (4) future preparation (not in the last experience): ``lambd`` × a supervised contrastive loss
  (SupCon, temperature ``simclr_temp``) on each future head's L2-normalised logits, for
  ``simclr_num_aug`` strongly augmented views (:func:`clrun.strategies.utils.strong_augment`)
  of up to ``simclr_batch_size`` incoming and as many memory samples, summed over the future heads and
  divided by their number and the number of samples; (5) logit constraints with margin ``m`` and
  weight ``eta``: on the incoming samples the present head's largest softmax probability must
  beat the past heads' by ``m`` (from the second experience on), and on incoming and memory
  samples the ground-truth head's largest logit must beat the future heads' by ``m`` (hinge,
  averaged over the samples that violate it).
- ``post_update``: memory update. Each class already in memory keeps its first
  ``memory_size // classes seen`` samples; the free slots go to the experience's classes evenly
  (the remainder to random classes), filled with the experience's samples in a random order. The
  new samples are stored raw with the model's logits on their augmented view, whose past-head
  logits are scaled to at most ``gamma`` × the ground-truth logit ("past-present"); then every
  memory sample of a past class gets its present and future heads' logits from the current
  model ("future-past", as in (3)). Batch-norm statistics are not updated by these passes or by
  the contrastive one (the code's ``bn_track_stats``).
- ``predict``: in task-incremental the logits of other tasks' heads are masked (the paper's
  task-IL evaluation); otherwise the model's outputs.

Not included: the code's options that are off by default (``align_bn``, ``start_from``). Scenarios:
``class`` and ``task`` with ``model.head=single`` (future heads must exist before their classes
arrive); ``domain`` is not supported (no per-experience heads). State: the memory (samples,
logits, generator) and the update counters of the experience. Continual unlearning (``forget``):
the forgotten experiences' samples leave the memory.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.buffers import Buffer
from clrun.checks import Rule, int_at_least, number_above, number_at_least, optional, require
from clrun.components import RunState
from clrun.config import ConfigError
from clrun.models import MASKED, SingleHead
from clrun.strategies.utils import model_input, piece, strong_augment


def _weight(name: str, v: object, rule: Rule | None = None) -> float:
    return float(require(f"X-DER {name}", v, rule or number_at_least(0)))


def _count(name: str, v: object, least: int = 1) -> int:
    return require(f"X-DER {name}", v, int_at_least(least))


class XDER:
    def __init__(
        self,
        memory_size: int = 500,
        alpha: float = 0.3,
        beta: float = 0.8,
        gamma: float = 0.85,
        lambd: float = 0.1,
        eta: float = 0.1,
        m: float = 0.3,
        simclr_temp: float = 5.0,
        simclr_batch_size: int = 64,
        simclr_num_aug: int = 2,
        minibatch_size: int | None = None,
        seed: int = 0,
    ):
        self.memory = Buffer(_count("memory_size", memory_size), seed)  # + field "logits"
        self.alpha, self.beta = _weight("alpha", alpha), _weight("beta", beta)
        self.gamma, self.lambd = _weight("gamma", gamma), _weight("lambd", lambd)
        self.eta, self.m = _weight("eta", eta), _weight("m", m)
        self.simclr_temp = _weight("simclr_temp", simclr_temp, number_above(0))
        self.simclr_batch_size = _count("simclr_batch_size", simclr_batch_size)
        self.simclr_num_aug = _count("simclr_num_aug", simclr_num_aug, least=2)
        batch = optional(int_at_least(1), "null (= strategy.batch_size)")
        require("X-DER minibatch_size", minibatch_size, batch)
        self.minibatch_size = minibatch_size
        self.counter = torch.zeros(memory_size)  # times each memory slot was drawn, this experience
        self.head_of: Tensor | None = None  # experience (head) of every class
        self.n_heads = 0

    # ------------------------------------------------------------------ heads

    def _setup(self, state: RunState) -> None:
        if self.head_of is not None:
            return
        if state.benchmark.scenario not in ("class", "task"):
            raise ConfigError(
                f"X-DER supports benchmark.scenario=class or task, not {state.benchmark.scenario}: "
                "its heads are the classes of each experience"
            )
        if not isinstance(getattr(state.model, "head", None), SingleHead):
            raise ConfigError(
                "X-DER needs model.head=single: it trains the units of classes not seen yet "
                "(future heads) before they arrive"
            )
        if len(state.benchmark.input_shape) != 3:
            raise ConfigError(
                f"X-DER needs image inputs (C, H, W) for its augmentations; benchmark="
                f"{state.benchmark.name} gives {tuple(state.benchmark.input_shape)}"
            )
        if getattr(state.benchmark, "train_origin", None) is not None:
            raise ConfigError(
                "X-DER updates its memory at the end of each experience, with all its data: "
                "benchmark.online=true is not supported"
            )
        heads = [exp.classes for exp in state.benchmark.train_stream]
        n = state.benchmark.n_classes
        head_of = torch.full((n,), len(heads), dtype=torch.long)  # classes in no experience: future
        for k, classes in enumerate(heads):
            if (head_of[classes] < len(heads)).any():
                raise ConfigError(
                    "X-DER needs experiences with disjoint classes (class-incremental)"
                )
            head_of[classes] = k
        self.head_of, self.n_heads = head_of.to(state.device), len(heads)
        with torch.inference_mode(False):  # the first call may come from evaluation
            self.counter = self.counter.to(state.device)

    def _units(self, k: int, which: str) -> Tensor:
        """(n_classes,) bool: the units of the past / present / future heads of experience k."""
        return {
            "past": self.head_of < k,
            "present": self.head_of == k,
            "future": self.head_of > k,
            "now_on": self.head_of >= k,
        }[which]

    def _update_logits(self, old: Tensor, new: Tensor, y: Tensor, units: Tensor) -> Tensor:
        """``old`` with its ``units`` replaced by ``new``'s, scaled to ``gamma`` × the ground-truth
        logit of ``old`` where their maximum exceeds it."""
        gt = old.gather(1, y.unsqueeze(1)).squeeze(1)
        top = new.masked_fill(~units, -math.inf).max(1).values
        scale = torch.where((top > gt) & (top != 0), self.gamma * gt / top, torch.ones_like(gt))
        return torch.where(units, new * scale.unsqueeze(1), old)

    # ------------------------------------------------------------------ training step

    def loss(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        self._setup(state)
        present = self._units(state.experience, "present")
        return F.cross_entropy(out.masked_fill(~present, -math.inf), batch.y)

    def penalty(self, state: RunState, batch: Experience, x: Tensor, out: Tensor) -> Tensor:
        self._setup(state)
        k, model = state.experience, state.model
        last = k == self.n_heads - 1
        past, present, future = (self._units(k, w) for w in ("past", "present", "future"))
        total = out.new_zeros(())
        bad, good = [], []  # for the future constraint
        if not last:
            bad.append(out.masked_fill(~future, -math.inf).max(1).values)
            good.append(out.masked_fill(~present, -math.inf).max(1).values)
        if len(self.memory) > 0:
            n = self.minibatch_size or state.batch_size
            idx1 = self.memory.sample_index(n)
            mem1 = self.memory.samples(idx1)
            out1 = model(model_input(state, mem1, train=True), mem1.t).float()
            total = total + self.alpha * F.mse_loss(out1, self.memory.get("logits", idx1))
            idx2 = self.memory.sample_index(n)
            mem2 = self.memory.samples(idx2)
            out2 = model(model_input(state, mem2, train=True), mem2.t).float()
            if k > 0:
                past_ce = out2.masked_fill(~past, -math.inf)
                total = total + self.beta * F.cross_entropy(past_ce, mem2.y)
            idx, outs, y = (
                torch.cat([idx1, idx2]),
                torch.cat([out1, out2]),
                torch.cat([mem1.y, mem2.y]),
            )
            slot_first = torch.full((self.memory.max_size,), len(idx), device=idx.device)
            slot_first.scatter_reduce_(0, idx, torch.arange(len(idx), device=idx.device), "amin")
            unique = slot_first[idx] == torch.arange(len(idx), device=idx.device)
            idx, outs, y = idx[unique], outs[unique], y[unique]
            self._future_past_online(k, idx, outs.detach(), y)
            if not last:
                own = self.head_of.unsqueeze(0) == self.head_of[y].unsqueeze(1)
                bad.append(outs.masked_fill(~future, -math.inf).max(1).values)
                good.append(outs.masked_fill(~own, -math.inf).max(1).values)
        if not last and self.lambd > 0:
            total = total + self.lambd * self._future_preparation(state, batch, k)
        if k > 0 and self.eta > 0:
            seen = past | present
            prob = F.softmax(out.masked_fill(~seen, -math.inf), 1)
            worst_past = prob.masked_fill(~past, -1).max(1).values.detach()
            best_present = prob.masked_fill(~present, -1).max(1).values
            total = total + self.eta * _hinge_mean(worst_past + self.m - best_present)
        if not last and self.eta > 0:
            total = total + self.eta * _hinge_mean(torch.cat(bad) + self.m - torch.cat(good))
        return total

    @torch.no_grad()
    def _future_past_online(self, k: int, idx: Tensor, outs: Tensor, y: Tensor) -> None:
        of_past = self.head_of[y] < k
        self.counter.index_add_(0, idx, of_past.to(self.counter.dtype))
        draw = torch.rand(len(idx), generator=self.memory.generator).to(idx.device)
        chosen = of_past & (draw * self.counter[idx] < 1)
        stored = self.memory.get("logits", idx)
        updated = self._update_logits(stored, outs, y, self._units(k, "now_on"))
        self.memory.set("logits", idx, torch.where(chosen.unsqueeze(1), updated, stored))

    def _future_preparation(self, state: RunState, batch: Experience, k: int) -> Tensor:
        nb, views = self.simclr_batch_size, self.simclr_num_aug
        x, e, t, y = batch.x[:nb], batch.e[:nb], batch.t[:nb], batch.y[:nb]
        if len(self.memory) > 0:
            mem = self.memory.samples(self.memory.sample_index(nb))
            x, e, t, y = (
                torch.cat([a, b])
                for a, b in zip((mem.x, mem.e, mem.t, mem.y), (x, e, t, y), strict=True)
            )
        with torch.no_grad():
            scale = getattr(state.benchmark, "pixel_scale", 255.0)
            aug = strong_augment(x.repeat_interleave(views, 0), self.memory.generator, scale)
        views_of = Experience(
            -1,
            aug,
            y.repeat_interleave(views),
            t.repeat_interleave(views),
            e.repeat_interleave(views),
        )
        with _batch_norm_frozen(state.model):
            out = state.model(model_input(state, views_of), views_of.t).float()
        out = out.view(len(y), views, -1)
        heads = range(k + 1, self.n_heads)
        loss = sum(
            supcon(F.normalize(out[:, :, self.head_of == h], dim=2), y, self.simclr_temp)
            for h in heads
        )
        return loss / (len(heads) * len(y))

    # ------------------------------------------------------------------ memory update

    @torch.no_grad()
    def post_update(self, state: RunState, exp: Experience) -> None:
        self._setup(state)
        k, model, mem = exp.index, state.model, self.memory
        was_training = model.training
        model.train()
        seen = int((self.head_of <= k).sum())
        if len(mem) > 0:  # old classes keep their first memory_size // seen samples
            keep_per_class, kept, keep = mem.max_size // seen, {}, []
            for c in mem.data["y"].tolist():
                kept[c] = kept.get(c, 0) + 1
                keep.append(kept[c] <= keep_per_class)
            mem.remove(torch.tensor(keep, device=mem.data["y"].device))
        classes = exp.classes
        free = mem.max_size - len(mem)
        share = torch.full((len(classes),), free // len(classes), dtype=torch.long)
        share[torch.randperm(len(classes), generator=mem.generator)[: free % len(classes)]] += 1
        quota = dict(zip(classes, share.tolist(), strict=True))
        order = torch.randperm(len(exp), generator=mem.generator)
        chosen = []
        for i, c in zip(order.tolist(), exp.y[order.to(exp.y.device)].tolist(), strict=True):
            if quota.get(c, 0) > 0:
                quota[c] -= 1
                chosen.append(i)
        new = exp.subset(torch.tensor(chosen, dtype=torch.long, device=exp.y.device))
        logits = self._outputs(state, new)
        if k > 0:  # past-present: past heads' logits no higher than gamma × the ground truth's
            logits = self._update_logits(logits, logits, new.y, self._units(k, "past"))
        mem.extend(new, logits=logits)
        # future-past: the present and future heads' logits of past samples from the current model
        of_past = torch.nonzero(self.head_of[mem.data["y"]] < k).squeeze(1)
        if len(of_past):
            samples = mem.samples(of_past)
            stored = mem.get("logits", of_past)
            updated = self._update_logits(
                stored, self._outputs(state, samples), samples.y, self._units(k, "now_on")
            )
            mem.set("logits", of_past, updated)
        self.counter.zero_()
        model.train(was_training)

    def _outputs(self, state: RunState, samples: Experience) -> Tensor:
        """The model's logits on augmented views of ``samples`` (batch-norm stats untouched)."""
        out, bs = [], state.batch_size
        with _batch_norm_frozen(state.model):
            for i in range(0, len(samples), bs):
                s = piece(samples, i, i + bs)
                out.append(state.model(model_input(state, s, train=True), s.t).float())
        return (
            torch.cat(out)
            if out
            else torch.zeros(0, state.benchmark.n_classes, device=state.device)
        )

    # ------------------------------------------------------------------ evaluation, state

    def predict(self, state: RunState, x: Tensor, t: Tensor) -> Tensor:
        self._setup(state)
        out = state.model(x, t)
        if state.benchmark.scenario == "task":
            out = out.masked_fill(self.head_of.unsqueeze(0) != t.unsqueeze(1), MASKED)
        return out

    def forget(self, state: RunState, experiences: list[int]) -> None:
        """Continual unlearning: the forgotten experiences' samples leave the memory, with their
        logits; the freed slots go to the classes of the next experiences. The retained samples'
        logits are kept as they are (as DER's in the run's buffer)."""
        self.memory.purge(experiences)
        self.counter.zero_()

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict(), "counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.memory.load_state_dict(state["memory"])
        self.counter = state["counter"]


def supcon(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020), summed over anchors' means over views:
    ``features`` (N, views, d) normalised, ``labels`` (N,). Temperature = base temperature."""
    n, views, _ = features.shape
    z = features.transpose(0, 1).reshape(n * views, -1)  # view-major, as SupCon's unbind/cat
    logits = z @ z.T / temperature
    logits = logits - logits.max(1, keepdim=True).values.detach()
    lab = labels.repeat(views)
    not_self = ~torch.eye(n * views, dtype=torch.bool, device=z.device)
    positive = (lab.unsqueeze(0) == lab.unsqueeze(1)) & not_self
    log_prob = logits - torch.log((logits.exp() * not_self).sum(1, keepdim=True))
    mean_pos = (log_prob * positive).sum(1) / positive.sum(1)
    return -mean_pos.view(views, n).mean(0).sum()


def _hinge_mean(violation: Tensor) -> Tensor:
    """Mean of the positive entries (0 if none): the code's ``loss[loss > 0].mean()``."""
    return violation.clamp(min=0).sum() / (violation > 0).sum().clamp(min=1)


@contextmanager
def _batch_norm_frozen(model: torch.nn.Module):
    """Batch norm uses batch statistics but does not update its running ones."""
    bns = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True
