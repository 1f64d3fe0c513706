"""Task-conditioned backbones that architecture strategies put in place of a plain one: the
columns of Progressive Neural Networks (:class:`ProgressiveColumns`, ``strategy=pnn``) and the
hard-attention gates of HAT (:class:`HATGates`, ``strategy=hat``).

Both are built from a plain backbone of ``model=mlp`` or ``model=cnn``: an ``nn.Sequential`` of
linear / 3×3 conv layers, ReLU, max / average pooling, flatten and dropout
(:func:`segments` splits it into one segment per weight layer: the layer and what follows it up
to the next one). Their ``forward(x, t)`` takes the task labels, which
:class:`~clrun.models.CLModel` passes to a backbone whose ``task_conditioned`` is true. Each is a
dynamic module: ``adaptation(experience)`` (called by the runner right after ``pre_update``)
gives every new task label its column or embedding, and the optimiser is rebuilt.

Resume: the backbone's extra state names its kind; :func:`restore`, called by
``CLModel._load_from_state_dict``, puts the same wrapper around the plain backbone of a freshly
built model, and the wrapper then grows to the saved number of columns / task embeddings before
the weights load. Initial values drawn on that path use a forked random state (they are
overwritten right after), so loading never moves the run's global RNG.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from clrun.benchmarks import Experience
from clrun.errors import ConfigError

__all__ = ["HATGates", "ProgressiveColumns", "restore", "segments"]

WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
PLAIN_LAYERS = (*WEIGHT_LAYERS, nn.Flatten, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Dropout)


def segments(backbone: nn.Module, method: str) -> tuple[list[nn.Module], list[list[nn.Module]]]:
    """(stem, segments) of a plain backbone: the parameter-free modules before the first weight
    layer, then per weight layer the layer and the modules up to the next one. A one-line
    ConfigError for any other backbone."""
    mods = list(backbone) if isinstance(backbone, nn.Sequential) else []
    plain = mods and all(isinstance(m, PLAIN_LAYERS) for m in mods)
    grouped = all(getattr(m, "groups", 1) == 1 for m in mods)
    if not (plain and grouped and any(isinstance(m, WEIGHT_LAYERS) for m in mods)):
        raise ConfigError(
            f"{method} builds on model=mlp or model=cnn (linear or conv layers, ReLU, pooling, "
            f"dropout; no batch norm); this model's backbone is {type(backbone).__name__}"
        )
    stem: list[nn.Module] = []
    segs: list[list[nn.Module]] = []
    for m in mods:
        if isinstance(m, WEIGHT_LAYERS):
            segs.append([m])
        elif segs:
            segs[-1].append(m)
        else:
            stem.append(m)
    return stem, segs


def _run(modules: list[nn.Module], h: Tensor) -> Tensor:
    for m in modules:
        h = m(h)
    return h


def _task_index(table: Tensor, t: Tensor) -> Tensor:
    """Per sample, the slot of its task label in ``table`` (task → slot, −1 for none); labels
    the table does not know go to slot 0 (their head gives masked logits anyway)."""
    padded = torch.cat([table, table.new_full((1,), -1)])
    slot = padded[t.clamp(min=0, max=len(padded) - 1)]
    return torch.where(slot < 0, 0, slot)


def _grow_table(table: Tensor, task: int) -> Tensor:
    if task >= len(table):
        pad = table.new_full((task + 1 - len(table),), -1)
        table = torch.cat([table, pad])
    return table


# --------------------------------------------------------------------------- PNN


class LateralAdapter(nn.Module):
    """The non-linear lateral connection of Rusu et al. 2016, Eq. 2, into one layer of column k:
    ``U σ(V [α_1 h^(1); …; α_{k} h^(k)])`` over the previous columns' outputs of the layer below.
    α: one learned scalar per previous column ("initialized by a random small value": U(0, 0.1)
    here, the paper gives no number); V projects the concatenation onto n_{i−1} units (a 1×1
    convolution for conv layers); U has the shape of the column's own layer (kernel, stride,
    padding), without bias (the column's layer has one)."""

    def __init__(self, layer: nn.Module, n_previous: int):
        super().__init__()
        self.alphas = nn.Parameter(torch.rand(n_previous) * 0.1)
        if isinstance(layer, nn.Linear):
            n = layer.in_features
            self.V = nn.Linear(n * n_previous, n)
            self.U = nn.Linear(n, layer.out_features, bias=False)
        else:
            c = layer.in_channels
            self.V = nn.Conv2d(c * n_previous, c, 1)
            self.U = nn.Conv2d(
                c, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, bias=False
            )

    def forward(self, previous: list[Tensor]) -> Tensor:
        scaled = torch.cat([a * h for a, h in zip(self.alphas, previous, strict=True)], dim=1)
        return self.U(torch.relu(self.V(scaled)))


class ProgressiveColumns(nn.Module):
    """One column (a copy of the plain backbone) per task label, with lateral adapters from
    every previous column into each layer after the first (Rusu et al. 2016, Eq. 2). Column 0 is
    the model's own backbone; later columns are fresh copies (PyTorch's initialisation). Columns
    of earlier tasks and their adapters are frozen (no gradients, eval mode) once a new column
    exists. A task's features are its own column's output; the model's multi-head classifier is
    the column's output layer (no lateral into it, as in Avalanche's ``models/pnn.py``)."""

    task_conditioned = True
    kind = "pnn"

    def __init__(self, backbone: nn.Module):
        super().__init__()
        segments(backbone, "pnn")  # refuses anything but a plain mlp / cnn
        self.columns = nn.ModuleList([backbone])
        self.adapters = nn.ModuleList()  # adapters[k-1]: column k's, one per layer after the first
        self.register_buffer("task_to_column", torch.zeros(0, dtype=torch.long))

    def get_extra_state(self) -> dict:
        return {"kind": self.kind, "columns": len(self.columns)}

    def set_extra_state(self, state: dict) -> None:
        pass  # the columns were created from the saved count before loading (see below)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            with torch.random.fork_rng(devices=[]):
                while len(self.columns) < extra["columns"]:
                    self.add_column()
        table = state_dict.get(prefix + "task_to_column")
        if table is not None:
            self.task_to_column = torch.zeros_like(table).to(self.task_to_column.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def add_column(self) -> None:
        """A fresh column with adapters from every existing column; the existing ones freeze."""
        self.requires_grad_(False)
        column = copy.deepcopy(self.columns[0])
        for m in column.modules():
            if isinstance(m, WEIGHT_LAYERS):
                m.reset_parameters()
        column.requires_grad_(True)
        k = len(self.columns)
        _, segs = segments(column, "pnn")
        adapters = nn.ModuleList(LateralAdapter(seg[0], k) for seg in segs[1:])
        device = self.task_to_column.device
        self.columns.append(column.to(device))
        self.adapters.append(adapters.to(device))

    def adaptation(self, experience: Experience) -> bool:
        grew = False
        for task in experience.classes_by_task:
            self.task_to_column = _grow_table(self.task_to_column, task)
            if self.task_to_column[task] >= 0:
                continue
            used = int((self.task_to_column >= 0).sum())
            if used == len(self.columns):  # column 0 serves the first task
                self.add_column()
                grew = True
            self.task_to_column[task] = used
        return grew

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        if t is None:
            raise ValueError("progressive columns need task labels: use benchmark.scenario=task")
        column = _task_index(self.task_to_column, t)
        last = int(column.max()) if len(column) else 0  # one host sync: how many columns to run
        stem, _ = segments(self.columns[0], "pnn")
        h0 = _run(stem, x)
        outputs: list[Tensor] = []
        below: list[list[Tensor]] = []  # below[j][i]: column j's input to its layer i
        trainable = len(self.columns) - 1
        for j in range(last + 1):
            col = self.columns[j]
            col.train(self.training and j == trainable)  # frozen columns: dropout off
            _, segs = segments(col, "pnn")
            h, inputs = h0, []
            for i, seg in enumerate(segs):
                inputs.append(h)
                pre = seg[0](h)
                if i > 0 and j > 0:
                    pre = pre + self.adapters[j - 1][i - 1]([below[m][i] for m in range(j)])
                h = _run(seg[1:], pre)
            below.append(inputs)
            outputs.append(h)
        if last == 0:
            return outputs[0]
        stacked = torch.stack(outputs)
        return stacked[column, torch.arange(len(column), device=stacked.device)]


# --------------------------------------------------------------------------- HAT


class HATGates(nn.Module):
    """The plain backbone (``net``, its keys unchanged) with a hard-attention gate on the units
    of every weight layer (Serra et al. 2018): the output of layer l's segment (after its ReLU,
    pooling and dropout, as in the official ``mlp_hat.py`` / ``alexnet_hat.py``) is multiplied
    unit-wise (channel-wise for conv) by ``σ(s · e_l^t)``. ``embeddings[str(t)][l]`` is e_l^t,
    drawn from N(0, 1) as the official ``torch.nn.Embedding``. ``s`` is set by the HAT component
    during training (annealed); at evaluation the gates use ``s_max``. Embeddings of earlier
    tasks are frozen once a new task arrives."""

    task_conditioned = True
    kind = "hat"

    def __init__(self, backbone: nn.Module, s_max: float = 400.0):
        super().__init__()
        _, segs = segments(backbone, "hat")
        self.net = backbone
        self.units = [_units(seg[0]) for seg in segs]
        self.s_max = float(s_max)
        self.s = float(s_max)
        self.embeddings = nn.ModuleDict()  # task label (str) → one embedding per weight layer
        self.register_buffer("task_to_slot", torch.zeros(0, dtype=torch.long))

    def get_extra_state(self) -> dict:
        return {"kind": self.kind, "s_max": self.s_max, "tasks": list(self.embeddings)}

    def set_extra_state(self, state: dict) -> None:
        pass

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            with torch.random.fork_rng(devices=[]):
                for task in extra["tasks"]:
                    if task not in self.embeddings:
                        self._add_task(int(task))
        table = state_dict.get(prefix + "task_to_slot")
        if table is not None:
            self.task_to_slot = torch.zeros_like(table).to(self.task_to_slot.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _add_task(self, task: int) -> None:
        self.embeddings.requires_grad_(False)
        device = self.task_to_slot.device
        emb = nn.ParameterList(nn.Parameter(torch.randn(n, device=device)) for n in self.units)
        self.embeddings[str(task)] = emb
        self.task_to_slot = _grow_table(self.task_to_slot, task)
        self.task_to_slot[task] = len(self.embeddings) - 1

    def adaptation(self, experience: Experience) -> bool:
        new = [t for t in experience.classes_by_task if str(t) not in self.embeddings]
        for task in new:
            self._add_task(task)
        return bool(new)

    def gates(self, task: int, s: float | None = None) -> list[Tensor]:
        """σ(s · e_l^task) for every layer l (``s`` default: s_max)."""
        s = self.s_max if s is None else s
        return [torch.sigmoid(s * e) for e in self.embeddings[str(task)]]

    def forward(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        if t is None:
            raise ValueError("HAT needs task labels: use benchmark.scenario=task")
        stem, segs = segments(self.net, "hat")
        s = self.s if self.training else self.s_max
        slot = _task_index(self.task_to_slot, t)
        tables = list(self.embeddings.values())
        h = _run(stem, x)
        for i, seg in enumerate(segs):
            h = _run(seg, h)
            if tables:  # (tasks, units) → per sample (B, units)
                e = torch.stack([emb[i] for emb in tables])[slot]
                gate = torch.sigmoid(s * e)
                h = h * gate.view(*gate.shape, *([1] * (h.dim() - 2)))
        return h


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


KINDS: dict[str, type[nn.Module]] = {"pnn": ProgressiveColumns, "hat": HATGates}


def restore(model: nn.Module, state_dict: dict, prefix: str) -> None:
    """Put the saved task-conditioned wrapper (``backbone._extra_state``) around the plain
    backbone of a freshly built model, before its weights load."""
    extra = state_dict.get(prefix + "backbone._extra_state")
    if not isinstance(extra, dict) or extra.get("kind") not in KINDS:
        return
    cls = KINDS[extra["kind"]]
    if isinstance(model.backbone, cls):
        return
    options = {"s_max": extra["s_max"]} if cls is HATGates else {}
    model.backbone = cls(model.backbone, **options)
