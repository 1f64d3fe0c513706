"""Replay buffers: fixed-capacity memories of past samples, separate from the methods that use them.

A buffer stores raw samples in their compact dtype (uint8 images) with targets, task labels and
source experience, on the run's device. Methods call ``update(...)`` with new samples (a whole
experience or a minibatch) and ``sample(n)`` to draw a replay minibatch. ``resize(n)`` changes
the capacity. Every buffer owns a seeded ``torch.Generator`` and round-trips through
``state_dict()`` / ``load_state_dict()``.

- :class:`ReservoirBuffer`: reservoir sampling (Vitter 1985): after n samples seen, each has
  probability capacity/n of being in memory.
- :class:`ClassBalancedBuffer`: the capacity is split evenly over the groups seen so far (class,
  task or experience: ``groupby``); each group keeps a random selection of its samples.
"""

from __future__ import annotations

import torch
from torch import Tensor

from clrun.benchmarks import Experience, concat

FIELDS = ("x", "y", "t", "e")
GROUPBY = ("class", "task", "experience")


class Buffer:
    """Storage and sampling shared by all buffers."""

    def __init__(self, max_size: int, seed: int = 0):
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"buffer.max_size={max_size!r} must be an integer ≥ 1")
        self.max_size = max_size
        self.generator = torch.Generator().manual_seed(seed)
        self.data: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self.data["y"]) if self.data else 0

    def samples(self) -> Experience:
        """Everything in memory, as one set of samples."""
        return Experience(-1, *(self.data[f] for f in FIELDS))

    def sample(self, n: int) -> Experience:
        """n samples drawn uniformly without replacement (all of them if fewer are stored)."""
        size = len(self)
        idx = torch.randperm(size, generator=self.generator)[: min(n, size)]
        return self.samples().subset(idx.to(self.data["y"].device))

    def remove(self, keep: Tensor) -> None:
        """Keep only the samples where the boolean mask ``keep`` is true."""
        self.data = {f: v[keep] for f, v in self.data.items()}

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

    def update(self, new: Experience) -> None:
        n = len(new)
        if n == 0:
            return
        device = new.y.device
        if not self.data:
            self.data = {f: getattr(new, f)[:0].clone() for f in FIELDS}
        # Fill free slots first, in arrival order.
        free = min(self.max_size - len(self), n)
        if free > 0:
            self.data = {f: torch.cat([v, getattr(new, f)[:free]]) for f, v in self.data.items()}
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
            for f in FIELDS:
                self.data[f][slot_d] = getattr(new, f)[src_d]
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
    first ``max_size % n_groups`` groups in order of arrival get one slot more. Within a group the
    kept samples are a random selection of all samples the group has received."""

    def __init__(
        self, max_size: int, groupby: str = "class", selection: str = "random", seed: int = 0
    ):
        super().__init__(max_size, seed)
        if groupby not in GROUPBY:
            raise ValueError(f"buffer.groupby={groupby!r} is not one of {', '.join(GROUPBY)}")
        if selection != "random":
            raise ValueError(f"buffer.selection={selection!r} is not one of random")
        self.groupby, self.selection = groupby, selection
        self.groups: list[int] = []  # in order of arrival

    def _key(self, s: Experience) -> Tensor:
        return {"class": s.y, "task": s.t, "experience": s.e}[self.groupby]

    def quotas(self) -> dict[int, int]:
        n = len(self.groups)
        base, extra = divmod(self.max_size, n) if n else (0, 0)
        return {g: base + (k < extra) for k, g in enumerate(self.groups)}

    def update(self, new: Experience) -> None:
        if len(new) == 0:
            return
        pool = new if not self.data else concat([self.samples(), new], -1)
        for g in torch.unique(self._key(new)).tolist():
            if g not in self.groups:
                self.groups.append(g)
        self._select(pool)

    def resize(self, max_size: int) -> None:
        self.max_size = max_size
        if self.data:
            self._select(self.samples())

    def _select(self, pool: Experience) -> None:
        key = self._key(pool).cpu()
        keep = torch.zeros(len(pool), dtype=torch.bool)
        for g, quota in self.quotas().items():
            idx = torch.nonzero(key == g).squeeze(1)
            if len(idx) > quota:
                idx = idx[torch.randperm(len(idx), generator=self.generator)[:quota]]
            keep[idx] = True
        keep = keep.to(pool.y.device)
        self.data = {f: getattr(pool, f)[keep] for f in FIELDS}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "groups": list(self.groups)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.groups = list(state["groups"])
