"""Replay buffers: fixed-capacity memories of past samples, separate from the methods that use them.

A buffer stores raw samples in their compact dtype (uint8 images) with targets, task labels and
source experience, on the run's device. Methods call ``update(samples)`` with new samples (a whole
experience or a minibatch) and ``sample(n)`` to draw a replay minibatch. ``resize(n)`` changes
the capacity. Every buffer owns a seeded ``torch.Generator`` and round-trips through
``state_dict()`` / ``load_state_dict()``.

- :class:`ReservoirBuffer`: reservoir sampling (Vitter 1985): after n samples seen, each has
  probability capacity/n of being in memory.
- :class:`ClassBalancedBuffer`: the capacity is split evenly over the groups seen so far (class,
  task or experience: ``groupby``). ``selection`` chooses which samples a group keeps:
  ``random``; ``herding`` (Welling 2009, as in iCaRL: greedily the sample that brings the mean of
  the chosen ones closest to the group's mean feature); ``closest_to_center`` (the samples
  nearest to the group's mean feature). The ranked selections need features: pass
  ``update(samples, features=fn)``, ``fn`` mapping samples to a (n, d) feature tensor
  (:func:`clrun.strategies.utils.backbone_features` gives the model's L2-normalised backbone
  features). Ranked groups are stored in rank order, so shrinking a group drops its last-ranked
  samples (iCaRL's "reduce exemplar set") and needs no features.

Extra per-sample fields. ``update(samples, logits=...)`` (any keyword) stores one more tensor per
sample (e.g. the logits DER replays); the first update fixes the set of fields and every later
update must give the same ones. Extra fields follow their samples through selection, ``remove``,
``state_dict``; read them with ``get(name, idx)`` at the positions ``sample_index(n)`` drew, and
overwrite them with ``set(name, idx, values)``.

Group-balanced draws. ``sample_index(n, balance=...)`` / ``sample(n, balance=...)`` with
``balance`` = ``class`` | ``task`` | ``experience`` give every group present in memory an equal
share of the ``n`` draws (the remainder goes to randomly chosen groups); a group with fewer samples
than its share repeats them, each as evenly as possible (oversampling, like Avalanche's
group-balanced replay loaders). ``balance=none`` draws uniformly without replacement.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from clrun.benchmarks import Experience
from clrun.checks import int_at_least, one_of, optional, require

FIELDS = ("x", "y", "t", "e")
GROUPBY = ("class", "task", "experience")
SELECTIONS = ("random", "herding", "closest_to_center")
BALANCE = ("none", *GROUPBY)
KEY_FIELD = {"class": "y", "task": "t", "experience": "e"}

FeatureFn = Callable[[Experience], Tensor]


def check_balance(balance: str, owner: str) -> str:
    """Validate a ``balance`` option (``owner`` names the parameter in the message)."""
    return require(owner, balance, one_of(BALANCE))


class Buffer:
    """Storage and sampling shared by all buffers. On its own it applies no policy: ``extend``
    appends samples (methods that manage their own memory, like X-DER and GDumb, use it)."""

    def __init__(self, max_size: int, seed: int = 0):
        require("buffer.max_size", max_size, int_at_least(1))
        self.max_size = max_size
        self.generator = torch.Generator().manual_seed(seed)
        self.data: dict[str, Tensor] = {}

    needs_features = False  # True where ``update`` needs a feature function

    def __len__(self) -> int:
        return len(self.data["y"]) if self.data else 0

    @property
    def extra_fields(self) -> tuple[str, ...]:
        return tuple(f for f in self.data if f not in FIELDS)

    def samples(self, idx: Tensor | None = None) -> Experience:
        """Everything in memory (or the samples at positions ``idx``), as one set of samples."""
        exp = Experience(-1, *(self.data[f] for f in FIELDS))
        return exp if idx is None else exp.subset(idx)

    def get(self, name: str, idx: Tensor | None = None) -> Tensor:
        """The extra field ``name`` (e.g. ``logits``) of all samples, or of those at ``idx``."""
        return self.data[name] if idx is None else self.data[name][idx]

    def set(self, name: str, idx: Tensor, values: Tensor) -> None:
        """Overwrite the extra field ``name`` of the samples at positions ``idx``."""
        self.data[name][idx] = values.to(self.data[name].dtype)

    def sample_index(self, n: int, balance: str = "none") -> Tensor:
        """Positions of ``n`` samples: uniform without replacement (all of them if fewer are
        stored) or, with ``balance``, an equal share per group (see the module docstring)."""
        size = len(self)
        if size == 0:
            return torch.zeros(0, dtype=torch.long)
        device = self.data["y"].device
        if balance == "none":
            return torch.randperm(size, generator=self.generator)[: min(n, size)].to(device)
        check_balance(balance, "balance")
        key = self.data[KEY_FIELD[balance]].cpu()
        groups = torch.unique(key)
        base, extra = divmod(n, len(groups))
        share = torch.full((len(groups),), base, dtype=torch.long)
        share[torch.randperm(len(groups), generator=self.generator)[:extra]] += 1
        picks = []
        for g, s in zip(groups.tolist(), share.tolist(), strict=True):
            members = torch.nonzero(key == g).squeeze(1)
            rounds = math.ceil(s / len(members))
            order = [torch.randperm(len(members), generator=self.generator) for _ in range(rounds)]
            picks.append(members[torch.cat(order)[:s]] if order else members[:0])
        return torch.cat(picks).to(device)

    def sample(self, n: int, balance: str = "none") -> Experience:
        """n samples (see :meth:`sample_index`)."""
        return self.samples(self.sample_index(n, balance))

    def remove(self, keep: Tensor) -> None:
        """Keep only the samples where the boolean mask ``keep`` is true."""
        self.data = {f: v[keep] for f, v in self.data.items()}

    def purge(self, experiences: list[int]) -> int:
        """Remove every sample that came from one of ``experiences`` (continual unlearning);
        returns how many were removed. The freed capacity fills with later samples."""
        if not self.data:
            return 0
        e = self.data["e"]
        gone = torch.isin(e, torch.tensor(list(experiences), dtype=e.dtype, device=e.device))
        self.remove(~gone)
        return int(gone.sum())

    def extend(self, new: Experience, **extra: Tensor) -> None:
        """Append samples (and their extra fields) as they are; the caller keeps the capacity."""
        incoming = self._incoming(new, extra)
        if len(self) + len(new) > self.max_size:
            raise ValueError(f"extend: {len(self)} + {len(new)} samples exceed {self.max_size}")
        self.data = {f: torch.cat([self.data[f], v]) for f, v in incoming.items()}

    def _incoming(self, new: Experience, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        """The new samples as a dict of fields, checked against the fields already stored (the
        first update fixes them); creates the empty storage on first use."""
        for name, v in extra.items():
            if name in FIELDS or v.shape[0] != len(new):
                raise ValueError(
                    f"buffer extra field {name!r} must be a new name with one row per sample "
                    f"({len(new)}), got shape {tuple(v.shape)}"
                )
        incoming = {**{f: getattr(new, f) for f in FIELDS}, **extra}
        if not self.data:
            self.data = {f: v[:0].clone() for f, v in incoming.items()}
        elif set(incoming) != set(self.data):
            raise ValueError(
                f"this buffer stores the fields {sorted(self.data)}; the update gave "
                f"{sorted(incoming)} (one buffer cannot be shared by methods that store "
                "different per-sample fields)"
            )
        return {f: incoming[f] for f in self.data}

    def state_dict(self) -> dict:
        return {
            "max_size": self.max_size,
            "generator": self.generator.get_state(),
            "data": dict(self.data),
        }

    def load_state_dict(self, state: dict) -> None:
        self.max_size = state["max_size"]
        self.generator.set_state(state["generator"])
        self.data = dict(state["data"])


class ReservoirBuffer(Buffer):
    """Reservoir sampling over everything ever passed to ``update``."""

    def __init__(self, max_size: int, seed: int = 0):
        super().__init__(max_size, seed)
        self.seen = 0

    def update(self, new: Experience, features: FeatureFn | None = None, **extra: Tensor) -> None:
        n = len(new)
        if n == 0:
            return
        incoming = self._incoming(new, extra)
        device = new.y.device
        # Fill free slots first, in arrival order.
        free = min(self.max_size - len(self), n)
        if free > 0:
            self.data = {f: torch.cat([v, incoming[f][:free]]) for f, v in self.data.items()}
        # Sample k (0-based count self.seen + k) replaces slot j ~ U{0..seen+k} if j < max_size.
        counts = torch.arange(self.seen + free, self.seen + n, dtype=torch.float64) + 1
        slots = (
            torch.rand(n - free, generator=self.generator, dtype=torch.float64) * counts
        ).long()
        src = torch.arange(free, n)
        hit = slots < self.max_size
        slots, src = slots[hit], src[hit]
        if len(slots):
            # Several samples may hit the same slot: the last one in arrival order wins.
            last = torch.zeros(self.max_size, dtype=torch.long).fill_(-1)
            last.scatter_reduce_(0, slots, src, reduce="amax")
            slot = torch.nonzero(last >= 0).squeeze(1)
            src_d, slot_d = last[slot].to(device), slot.to(device)
            for f in self.data:
                self.data[f][slot_d] = incoming[f][src_d]
        self.seen += n

    def resize(self, max_size: int) -> None:
        if len(self) > max_size:
            keep = torch.zeros(len(self), dtype=torch.bool)
            keep[torch.randperm(len(self), generator=self.generator)[:max_size]] = True
            self.remove(keep.to(self.data["y"].device))
        self.max_size = max_size

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.seen = state["seen"]


class ClassBalancedBuffer(Buffer):
    """Equal share of the capacity per group (``groupby``: class, task or experience); the
    first ``max_size % n_groups`` groups in order of arrival get one slot more. ``max_per_group``
    caps every share: with ``max_size`` = groups × ``max_per_group`` each group keeps exactly
    ``max_per_group`` samples however few groups have arrived (a budget per class, as van de
    Ven et al.'s ``--budget``), instead of the early groups sharing the whole capacity. Within a
    group the kept samples are chosen by ``selection`` among the group's stored samples and the
    new ones: ``random``, ``herding`` or ``closest_to_center`` (the last two need ``features``)."""

    def __init__(
        self,
        max_size: int,
        groupby: str = "class",
        selection: str = "random",
        seed: int = 0,
        max_per_group: int | None = None,
    ):
        super().__init__(max_size, seed)
        cap = optional(int_at_least(1), "null (no cap)")
        self.max_per_group = require("buffer.max_per_group", max_per_group, cap)
        require("buffer.groupby", groupby, one_of(GROUPBY))
        require("buffer.selection", selection, one_of(SELECTIONS))
        self.groupby, self.selection = groupby, selection
        self.groups: list[int] = []  # in order of arrival

    @property
    def needs_features(self) -> bool:
        return self.selection != "random"

    def quotas(self) -> dict[int, int]:
        n = len(self.groups)
        base, extra = divmod(self.max_size, n) if n else (0, 0)
        cap = self.max_per_group or self.max_size
        return {g: min(base + (k < extra), cap) for k, g in enumerate(self.groups)}

    def update(self, new: Experience, features: FeatureFn | None = None, **extra: Tensor) -> None:
        if len(new) == 0:
            return
        if self.needs_features and features is None:
            raise ValueError(
                f"buffer.selection={self.selection} ranks samples by their features: "
                "call update(samples, features=fn) with fn mapping samples to a feature tensor"
            )
        n_old = len(self)
        incoming = self._incoming(new, extra)
        pool = {f: torch.cat([v, incoming[f]]) for f, v in self.data.items()}
        for g in torch.unique(incoming[KEY_FIELD[self.groupby]]).tolist():
            if g not in self.groups:
                self.groups.append(g)
        if self.selection == "random":
            self._select_random(pool)
        else:
            self._select_ranked(pool, n_old, features)

    def purge(self, experiences: list[int]) -> int:
        """As :meth:`Buffer.purge`; groups left without samples give their share back."""
        removed = super().purge(experiences)
        left = set(self.data[KEY_FIELD[self.groupby]].unique().tolist()) if self.data else set()
        self.groups = [g for g in self.groups if g in left]
        return removed

    def resize(self, max_size: int) -> None:
        self.max_size = max_size
        if not self.data:
            return
        if self.selection == "random":
            self._select_random(dict(self.data))
        else:
            self._select_ranked(dict(self.data), len(self), None)

    def _select_random(self, pool: dict[str, Tensor]) -> None:
        key = pool[KEY_FIELD[self.groupby]].cpu()
        keep = torch.zeros(len(key), dtype=torch.bool)
        for g, quota in self.quotas().items():
            idx = torch.nonzero(key == g).squeeze(1)
            if len(idx) > quota:
                idx = idx[torch.randperm(len(idx), generator=self.generator)[:quota]]
            keep[idx] = True
        keep = keep.to(pool["y"].device)
        self.data = {f: v[keep] for f, v in pool.items()}

    def _select_ranked(self, pool: dict[str, Tensor], n_old: int, features: FeatureFn | None):
        """Groups that received new samples are ranked afresh over their stored and new samples;
        the others keep their stored rank order, cut to the quota."""
        key = pool[KEY_FIELD[self.groupby]].cpu()
        order = []
        for g, quota in self.quotas().items():
            idx = torch.nonzero(key == g).squeeze(1)
            if len(idx) > 0 and idx[-1] >= n_old:  # new samples arrived for this group
                members = Experience(-1, *(pool[f][idx.to(pool["y"].device)] for f in FIELDS))
                feats = features(members).detach().double().cpu()
                idx = idx[rank(feats, self.selection, min(quota, len(idx)))]
            order.append(idx[:quota])
        order = torch.cat(order).to(pool["y"].device)
        self.data = {f: v[order] for f, v in pool.items()}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "groups": list(self.groups)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.groups = list(state["groups"])


def rank(features: Tensor, selection: str, k: int) -> Tensor:
    """The positions of the first ``k`` samples in ``selection`` order, for (n, d) ``features``.

    ``herding``: greedily, the sample that makes the mean of the chosen ones closest to the mean
    of all (Welling 2009; iCaRL's ConstructExemplarSet), each sample at most once.
    ``closest_to_center``: by distance to the mean. Ties go to the earlier sample."""
    mu = features.mean(0)
    if selection == "closest_to_center":
        return torch.argsort((features - mu).pow(2).sum(1), stable=True)[:k]
    require("selection", selection, one_of(("herding", "closest_to_center")))
    # ||mu - (s + f)/i||² up to a constant, with s the sum of the i-1 chosen: kept incrementally.
    mu_f, f_f = features @ mu, features.pow(2).sum(1)
    s_f = torch.zeros_like(mu_f)  # s · f for every candidate
    s_mu = s_s = 0.0  # s · mu, s · s
    available = torch.ones(len(features), dtype=torch.bool)
    chosen = []
    for i in range(1, k + 1):
        dist = (s_s + 2 * s_f + f_f) / i**2 - 2 * (s_mu + mu_f) / i
        j = int(torch.argmin(dist.masked_fill(~available, math.inf)))
        chosen.append(j)
        available[j] = False
        s_s += float(2 * s_f[j] + f_f[j])
        s_mu += float(mu_f[j])
        s_f += features @ features[j]
    return torch.tensor(chosen, dtype=torch.long)
