"""The core of every benchmark: experiences, the Benchmark, scenarios, class orders, the
stream builders several datasets share, and the online stream.

A benchmark is built once per run and moved to the run's device. Every experience holds its raw
samples in their compact dtype (uint8 images) together with targets, task labels and the index of
the experience each sample came from. Minibatches are index gathers; `Benchmark.prepare` turns a
gathered raw batch into model input on the device: augmentation (training only), the
per-experience domain transform (a pixel permutation or a rotation), then normalisation. Nothing
here needs a DataLoader. Zero padding (``benchmark.pad``) is applied once, to the stored images;
``benchmark.normalize=false`` replaces the standardisation by pixels / 255.

Scenarios (``benchmark.scenario``):

- ``class``: one label space over all classes, task labels are all 0.
- ``task``: same targets, but every sample carries its experience index as task label
  (train and test), so a multi-head model can route it.
- ``domain``: every experience has the same label space. Split benchmarks use the position of a
  class inside its experience (for the default order of Split MNIST: ``y mod 2``, even/odd);
  permuted and rotated MNIST keep the digit labels.

Validation (``benchmark.validation``, a fraction in [0, 1)): a seeded, class-stratified share of
every training experience is held out into ``Benchmark.validation_stream`` (one validation
experience per training experience, same index, task labels and ``e``) and never trained on. It
is cut before the online stream, so an online stream streams only what is left. Experiences that
share their raw images (permuted MNIST) hold out the same images, so memory stays flat.

Online streams (``benchmark.online=true``): every training experience is cut, in a seeded random
order, into mini-experiences of ``benchmark.online_batch_size`` samples, each to be trained in
one pass (``strategy.epochs=1``), as Avalanche's ``ocl_split`` does. The test stream keeps one
experience per original experience, so the accuracy matrix keeps one column per original
experience; ``Benchmark.origin(i)`` says which original experience train experience ``i``
belongs to and ``Benchmark.ends_experience(i)`` whether it is the last of it. A runner that
evaluates only where ``ends_experience`` is true writes one row per original experience:
R[i][j] is then the accuracy on test experience j after the whole of original experience i was
streamed, and every metric keeps its offline definition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks.augment import RandomCropFlip
from clrun.benchmarks.input import InputSpec
from clrun.checks import (
    Rule,
    boolean,
    int_at_least,
    is_number,
    number_above,
    number_in,
    one_of,
    require,
)

SCENARIOS = ("class", "task", "domain")


@dataclass
class Experience:
    """The samples of one experience: raw inputs ``x``, targets ``y``, task labels ``t`` and the
    index ``e`` of the experience each sample came from (mixed sets, e.g. a cumulative union,
    keep each sample's own ``e`` so its domain transform stays right)."""

    index: int
    x: Tensor
    y: Tensor
    t: Tensor
    e: Tensor

    def __len__(self) -> int:
        return self.y.shape[0]

    @cached_property
    def classes_by_task(self) -> dict[int, list[int]]:
        """Task label → sorted targets present (one host sync, once per experience)."""
        pairs = torch.unique(torch.stack([self.t, self.y]), dim=1).tolist()
        out: dict[int, list[int]] = {}
        for task, cls in zip(*pairs, strict=True):
            out.setdefault(task, []).append(cls)
        return out

    @property
    def classes(self) -> list[int]:
        return sorted({c for cs in self.classes_by_task.values() for c in cs})

    def subset(self, idx: Tensor) -> Experience:
        return Experience(self.index, self.x[idx], self.y[idx], self.t[idx], self.e[idx])

    def to(self, device: torch.device | str) -> Experience:
        return Experience(
            self.index, self.x.to(device), self.y.to(device), self.t.to(device), self.e.to(device)
        )


def concat(experiences: Sequence[Experience], index: int) -> Experience:
    """One experience holding the union of several (for cumulative and joint training)."""
    return Experience(
        index,
        torch.cat([ex.x for ex in experiences]),
        torch.cat([ex.y for ex in experiences]),
        torch.cat([ex.t for ex in experiences]),
        torch.cat([ex.e for ex in experiences]),
    )


@dataclass
class Benchmark:
    """Train and test streams plus what a model needs to know about the inputs."""

    name: str
    scenario: str
    train_stream: list[Experience]
    test_stream: list[Experience]
    n_classes: int  # width of the label space the model predicts in
    input_shape: tuple[int, ...]  # (C, H, W) of one prepared input, or (D,) for flat vectors
    mean: float | tuple[float, ...]  # normalisation: one value, or one per channel (per feature
    std: float | tuple[float, ...]  # for flat vectors), on the [0, 1] scale (raw / pixel_scale)
    transform: Callable[[Tensor, Tensor], Tensor] | None = None  # (x float 0..255, e) → x
    info: dict = field(default_factory=dict)
    augmentation: Callable[[Tensor, torch.Generator], Tensor] | None = None  # training only
    seed: int = 0  # seeds the benchmark's generator (augmentation)
    pixel_scale: float = 255.0  # raw value of a white pixel: 255 for uint8, 1 for float data
    train_origin: list[int] | None = None  # online: original experience of each train one
    validation_stream: list[Experience] = field(default_factory=list)  # held out of training
    model_input: InputSpec | None = None  # the model's own input (fit_input), else ours

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self._norm: dict = {}  # (device, ndim) → (shift, scale), built on first use
        self._fit_norm: dict = {}  # the same for the model's own normalisation (fit_input)
        shape = tuple(self.input_shape)
        require(
            "benchmark.mean", self.mean, _per_channel(Rule(is_number, "a finite number"), shape)
        )
        require("benchmark.std", self.std, _per_channel(number_above(0), shape))

    def to(self, device: torch.device | str) -> Benchmark:
        """Move every experience to ``device``. Tensors shared by several experiences (the one
        copy of MNIST behind every permuted experience) stay shared: memory stays flat."""
        moved: dict[tuple, Tensor] = {}

        def move(t: Tensor) -> Tensor:
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.device)
            if key not in moved:
                moved[key] = t.to(device)
            return moved[key]

        def stream(exps: list[Experience]) -> list[Experience]:
            return [
                Experience(ex.index, move(ex.x), move(ex.y), move(ex.t), move(ex.e)) for ex in exps
            ]

        self.train_stream, self.test_stream = stream(self.train_stream), stream(self.test_stream)
        self.validation_stream = stream(self.validation_stream)
        if hasattr(self.transform, "to"):
            self.transform = self.transform.to(device)
        return self

    def prepare(self, x: Tensor, e: Tensor, train: bool = False) -> Tensor:
        """Raw gathered batch → normalised float model input, on x's device. ``train=True``
        (the training step) first applies the benchmark's augmentation, if it has one."""
        fresh = False
        if train and self.augmentation is not None:
            x, fresh = self.augmentation(x, self.generator), True
        x = x.float() if fresh or x.dtype != torch.float32 else x.clone()  # never x's storage
        if self.transform is not None:
            x = self.transform(x, e)
        if self.model_input is not None:
            return self._fit(x, self.model_input)
        shift, scale = self._normalizer(x)
        return x.sub_(shift).mul_(scale)

    def fit_input(self, spec: InputSpec | None) -> None:
        """From now on, :meth:`prepare` makes batches fit the model's ``spec``: pixels to
        [0, 1], grey images repeated to the model's channels, resized (bilinear) to its size,
        standardised with its mean and std instead of the benchmark's. None: as before."""
        if spec is not None and len(self.input_shape) != 3:
            raise ValueError(
                f"benchmark {self.name}: inputs shaped {self.input_shape} are not images; "
                f"this model takes {spec.channels}×{spec.size[0]}×{spec.size[1]} images"
            )
        if spec is not None and self.input_shape[0] not in (1, spec.channels):
            raise ValueError(
                f"benchmark {self.name}: {self.input_shape[0]}-channel images cannot feed a model "
                f"that takes {spec.channels} channels"
            )
        self.model_input = spec
        self._fit_norm = {}

    def _fit(self, x: Tensor, spec: InputSpec) -> Tensor:
        if x.shape[1] != spec.channels:
            x = x.expand(-1, spec.channels, -1, -1)
        if tuple(x.shape[-2:]) != tuple(spec.size):
            x = F.interpolate(x, size=tuple(spec.size), mode="bilinear", align_corners=False)
        key = (x.device, x.shape[1])
        if key not in self._fit_norm:
            mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device)
            std = torch.tensor(spec.std, dtype=torch.float32, device=x.device)
            mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
            self._fit_norm[key] = (self.pixel_scale * mean, 1.0 / (self.pixel_scale * std))
        shift, scale = self._fit_norm[key]
        return (x - shift).mul_(scale)

    def _normalizer(self, x: Tensor) -> tuple[float | Tensor, float | Tensor]:
        key = (x.device, x.dim())
        if key not in self._norm:
            mean = np.atleast_1d(np.asarray(self.mean, dtype=np.float64))
            std = np.atleast_1d(np.asarray(self.std, dtype=np.float64))
            if len(mean) == len(std) == 1:  # python floats: the exact historical arithmetic
                self._norm[key] = (
                    self.pixel_scale * float(mean[0]),
                    1.0 / (self.pixel_scale * float(std[0])),
                )
            else:
                n = max(len(mean), len(std))
                mean, std = np.broadcast_to(mean, n), np.broadcast_to(std, n)
                shape = (n,) + (1,) * (x.dim() - 2)  # per channel (C, 1, 1) or per feature (D,)
                self._norm[key] = tuple(
                    torch.tensor(v, dtype=torch.float32, device=x.device).view(shape)
                    for v in (self.pixel_scale * mean, 1.0 / (self.pixel_scale * std))
                )
        return self._norm[key]

    def origin(self, i: int) -> int:
        """The original experience (and test experience) that train experience ``i`` is part
        of: ``i`` itself, except in an online stream."""
        return i if self.train_origin is None else self.train_origin[i]

    def ends_experience(self, i: int) -> bool:
        """Whether train experience ``i`` ends its original experience (always, offline): the
        points where a runner evaluates and writes a row of the accuracy matrix."""
        o = self.train_origin
        return o is None or i + 1 == len(o) or o[i + 1] != o[i]

    @cached_property
    def task_classes(self) -> list[list[int]] | None:
        """The classes of each test experience, where the stream has task structure (some
        experience holds only part of the label space: Split benchmarks, class or task
        scenario), else None. Task-IL accuracy restricts a sample's logits to these classes."""
        if self.scenario == "domain":
            return None
        classes = [ex.classes for ex in self.test_stream]
        if all(len(c) >= self.n_classes for c in classes):
            return None
        return classes

    def state_dict(self) -> dict:
        """The benchmark's random state (its augmentation generator): checkpoint it."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def _per_channel(each: Rule, input_shape: tuple[int, ...]) -> Rule:
    """One value for every channel, or one per channel (per feature for vectors); each ``each``."""
    n_in = input_shape[0]

    def check(value: object) -> bool:
        values = list(value) if isinstance(value, Sequence) else [value]
        return len(values) in (1, n_in) and all(each.check(v) for v in values)

    per_channel = f"a list of {n_in} (one per channel of inputs shaped {input_shape})"
    return Rule(check, f"{each.allowed}, or {per_channel}")


def _check_scenario(scenario: str) -> None:
    require("benchmark.scenario", scenario, one_of(SCENARIOS))


def _tuple_or_float(v: float | Sequence[float]) -> float | tuple[float, ...]:
    return tuple(float(a) for a in v) if isinstance(v, Sequence) else float(v)


def experience_of(
    i: int, x: Tensor, y: Tensor, t: Tensor | None, idx: Tensor, scenario: str
) -> Experience:
    """Experience ``i``: the samples ``idx`` of ``x`` with their labels ``y``. Task labels come
    from ``t`` where the data has them (task scenario), else they are ``i`` (task) or 0."""
    if scenario == "task" and t is not None:
        ti = t[idx].long()
    else:
        ti = torch.full_like(y, i if scenario == "task" else 0)
    xi = _as_images(x.index_select(0, idx))  # 2-5x faster than x[idx] on images
    return Experience(i, xi, y, ti, torch.full_like(y, i))


def _as_images(x: Tensor) -> Tensor:
    """(N, H, W) → (N, 1, H, W); (N, C, H, W) and flat (N, D) unchanged. Keeps the dtype."""
    return x.unsqueeze(1) if x.dim() == 3 else x


# --------------------------------------------------------------------------- stream building


def vandeven_class_order(n_classes: int, seed: int) -> list[int]:
    """The class order of van de Ven & Tolias's code (``data.py`` / ``data/load.py``): class ``c``
    is relabelled ``p[c]``, ``p = numpy.random.RandomState(seed).permutation(n_classes)`` (seed 0:
    no relabelling), and the experiences take labels 0-1, 2-3, ... in turn. With it a seed trains
    on the digit pairs their code draws for that seed (their 2018 table: seeds 0-19; their 2022
    article: 2-21)."""
    if seed == 0:
        return list(range(n_classes))
    return np.argsort(np.random.RandomState(seed).permutation(n_classes)).tolist()


def pilot_class_order(n_classes: int, seed: int) -> list[int]:
    """The class order of LAMDA-PILOT (``utils/data_manager.py``, ``shuffle: true``), which
    PyCIL and iCaRL share: ``numpy.random.seed(seed)`` then ``numpy.random.permutation(n_classes)``
    (the same draws as ``numpy.random.RandomState(seed).permutation``); the k-th class of the
    stream is ``order[k]``. PILOT's configs use seed 1993."""
    return np.random.RandomState(seed).permutation(n_classes).tolist()


def sorted_class_order(n_classes: int, seed: int) -> list[int]:
    """The dataset's own order, 0..n-1 (PILOT's ``shuffle: false``; the seed is not used)."""
    return list(range(n_classes))


NAMED_CLASS_ORDERS = {
    "vandeven": vandeven_class_order,
    "pilot": pilot_class_order,
    "sorted": sorted_class_order,
}


def _check_class_order(
    class_order: Sequence[int] | str | None, n_classes: int, seed: int
) -> list[int]:
    if class_order is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n_classes, generator=g).tolist()
    if isinstance(class_order, str):
        if class_order not in NAMED_CLASS_ORDERS:
            raise ValueError(
                f"benchmark.class_order={class_order!r} is not a list of classes, null or one of "
                f"the named orders {', '.join(NAMED_CLASS_ORDERS)}"
            )
        return NAMED_CLASS_ORDERS[class_order](n_classes, seed)
    order = [int(c) for c in class_order]
    if len(order) == 0:
        raise ValueError("benchmark.class_order=[] is empty; give every class once or null")
    bad = [c for c in order if not 0 <= c < n_classes]
    if bad:
        raise ValueError(
            f"benchmark.class_order has labels {bad} outside 0..{n_classes - 1} of this dataset"
        )
    if len(set(order)) != len(order):
        dup = sorted({c for c in order if order.count(c) > 1})
        raise ValueError(f"benchmark.class_order repeats classes {dup}; each class appears once")
    if len(order) != n_classes:
        missing = sorted(set(range(n_classes)) - set(order))
        raise ValueError(
            f"benchmark.class_order misses classes {missing}; it must list all {n_classes}"
        )
    return order


def _experience_sizes(name: str, n_total: int, n_experiences: int, first: int | None) -> list[int]:
    """Classes per experience: equal, or ``first`` in the first and the rest split evenly."""
    if first is None:
        if not 1 <= n_experiences <= n_total or n_total % n_experiences:
            raise ValueError(
                f"benchmark.n_experiences={n_experiences} must divide the {n_total} classes "
                f"of {name}"
            )
        return [n_total // n_experiences] * n_experiences
    rest, later = n_total - first, n_experiences - 1
    if not 1 <= first <= n_total or (later == 0) != (rest == 0) or (later and rest % later):
        raise ValueError(
            f"benchmark.first_experience_classes={first} with benchmark.n_experiences="
            f"{n_experiences}: the other {n_experiences - 1} experiences must split the "
            f"remaining {rest} of the {n_total} classes of {name} evenly (e.g. 50 and 6 for "
            "50 + 5×10 on CIFAR-100)"
        )
    return [first] + [rest // later] * later if later else [first]


def split_by_class(
    name: str,
    data: dict[str, Tensor],
    *,
    scenario: str,
    n_experiences: int,
    class_order: Sequence[int] | str | None,
    seed: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    first_experience_classes: int | None = None,
    n_classes: int | None = None,
    pixel_scale: float = 255.0,
) -> Benchmark:
    """Split a labelled dataset into experiences of disjoint classes (Split MNIST & co.).
    ``data`` may carry ``t_train`` / ``t_test``: the task labels of the ``task`` scenario
    (default: the experience index)."""
    _check_scenario(scenario)
    n_total = n_classes or int(data["y_train"].max()) + 1
    sizes = _experience_sizes(name, n_total, n_experiences, first_experience_classes)
    if scenario == "domain" and len(set(sizes)) > 1:
        raise ValueError(
            "benchmark.scenario=domain needs experiences of equal size (one shared label "
            "space); drop benchmark.first_experience_classes or use scenario class or task"
        )
    order = _check_class_order(class_order, n_total, seed)
    exp_of_class = torch.empty(n_total, dtype=torch.long)
    pos_in_exp = torch.empty(n_total, dtype=torch.long)
    starts = np.cumsum([0, *sizes]).tolist()
    for i, (a, b) in enumerate(zip(starts[:-1], starts[1:], strict=True)):
        for k, c in enumerate(order[a:b]):
            exp_of_class[c], pos_in_exp[c] = i, k

    def stream(x: Tensor, y: Tensor, t: Tensor | None) -> list[Experience]:
        y = y.long()
        exps = []
        for i in range(n_experiences):
            idx = torch.nonzero(exp_of_class[y] == i).squeeze(1)
            yi = pos_in_exp[y[idx]] if scenario == "domain" else y[idx]
            exps.append(experience_of(i, x, yi, t, idx, scenario))
        return exps

    return Benchmark(
        name=name,
        scenario=scenario,
        train_stream=stream(data["x_train"], data["y_train"], data.get("t_train")),
        test_stream=stream(data["x_test"], data["y_test"], data.get("t_test")),
        n_classes=sizes[0] if scenario == "domain" else n_total,
        input_shape=tuple(_as_images(data["x_train"][:1]).shape[1:]),
        mean=_tuple_or_float(mean),
        std=_tuple_or_float(std),
        info={
            "class_order": order,
            "classes_per_experience": sizes[0] if len(set(sizes)) == 1 else sizes,
        },
        seed=seed,
        pixel_scale=pixel_scale,
    )


def zero_pad(data: dict[str, Tensor], pad: int) -> dict[str, Tensor]:
    """The dataset with ``pad`` black (zero) pixels added on every side of every image, once, in
    its stored dtype: ``pad=2`` turns MNIST's 28×28 into the 32×32 of van de Ven et al.'s
    protocols (``transforms.Pad(2)``). Normalisation (``normalize=false``: pixels / 255, in [0, 1],
    as theirs) comes after, per batch; the padding is black before it, whatever the mean."""
    require("benchmark.pad", pad, Rule(int_at_least(0).check, "an integer ≥ 0 (pixels per side)"))
    if pad == 0:
        return data
    out = dict(data)
    for key in ("x_train", "x_test"):
        if data[key].dim() not in (3, 4):
            raise ValueError(
                f"benchmark.pad={pad} needs images, not inputs shaped {tuple(data[key].shape)}"
            )
        out[key] = F.pad(data[key], (pad, pad, pad, pad))
    return out


def _check_normalize(normalize: object) -> None:
    require("benchmark.normalize", normalize, boolean())


def online_stream(benchmark: Benchmark, batch_size: int, seed: int) -> Benchmark:
    """Cut every training experience into mini-experiences of ``batch_size`` samples (the last
    one may be smaller), in an order shuffled with ``seed``; the test stream is unchanged.

    Mini-experiences are views of one shuffled copy per experience (no per-batch copies); raw
    data that several experiences share (permuted MNIST) is shuffled once and stays shared.
    Each mini-experience is indexed by its position in the new train stream; its samples keep
    their original experience in ``e`` (domain transforms, buffers grouped by experience) and
    their task labels in ``t``. ``benchmark.train_origin`` maps it to the original experience."""
    require("benchmark.online_batch_size", batch_size, int_at_least(1))
    g = torch.Generator().manual_seed(seed)
    shuffled: dict[tuple, tuple[Tensor, Tensor]] = {}
    minis: list[Experience] = []
    origin: list[int] = []
    for ex in benchmark.train_stream:
        key = (ex.x.data_ptr(), ex.x.dtype, tuple(ex.x.shape))
        if key not in shuffled:
            perm = torch.randperm(len(ex), generator=g, device="cpu").to(ex.x.device)
            shuffled[key] = (perm, ex.x[perm])
        perm, x = shuffled[key]
        y, t, e = ex.y[perm], ex.t[perm], ex.e[perm]
        for start in range(0, max(len(ex), 1), batch_size):  # an empty experience stays one
            part = slice(start, start + batch_size)
            minis.append(Experience(len(minis), x[part], y[part], t[part], e[part]))
            origin.append(ex.index)
    benchmark.train_stream, benchmark.train_origin = minis, origin
    benchmark.info["online_batch_size"] = batch_size
    return benchmark


def hold_out_validation(benchmark: Benchmark, fraction: float, seed: int) -> Benchmark:
    """Move a seeded, class-stratified ``fraction`` of every training experience into
    ``benchmark.validation_stream``: of each class's n samples, round(n × fraction) are held out
    (at least one when n ≥ 2 and the fraction is above 0, at most n - 1), drawn with a generator
    seeded by ``seed``. Both parts keep the samples' original order. Experiences whose raw inputs
    are the same tensor (permuted and rotated MNIST) share one split of it."""
    require("benchmark.validation", fraction, number_in(0, 1, open_hi=True))
    if fraction == 0:
        return benchmark
    g = torch.Generator().manual_seed(seed + 7919)  # apart from the class order's draws
    splits: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
    train, validation = [], []
    for ex in benchmark.train_stream:
        key = (ex.x.data_ptr(), ex.x.dtype, tuple(ex.x.shape))
        if key not in splits:
            keep, held = _stratified_split(ex.y, fraction, g)
            splits[key] = (keep, held, ex.x.index_select(0, keep), ex.x.index_select(0, held))
        keep, held, x_keep, x_held = splits[key]
        train.append(Experience(ex.index, x_keep, ex.y[keep], ex.t[keep], ex.e[keep]))
        validation.append(Experience(ex.index, x_held, ex.y[held], ex.t[held], ex.e[held]))
    benchmark.train_stream, benchmark.validation_stream = train, validation
    benchmark.info["validation"] = fraction
    return benchmark


def _stratified_split(y: Tensor, fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(kept, held-out) indices into ``y``, each sorted: per class, a random round(n × fraction)
    held out (clamped to 1..n-1 where n ≥ 2)."""
    held = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).squeeze(1)
        n = len(idx)
        k = min(max(round(n * fraction), 1), n - 1) if n >= 2 else 0
        held.append(idx[torch.randperm(n, generator=g)[:k]])
    out = torch.zeros(len(y), dtype=torch.bool)
    out[torch.cat(held)] = True
    return torch.nonzero(~out).squeeze(1), torch.nonzero(out).squeeze(1)


def _finish(
    b: Benchmark,
    *,
    augment: bool = False,
    flip: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
    validation: float = 0.0,
) -> Benchmark:
    """Apply the options every benchmark shares: the validation split, augmentation, the online
    stream (cut from what the validation split leaves)."""
    hold_out_validation(b, validation, b.seed)
    if augment:
        if len(b.input_shape) != 3:
            raise ValueError(
                f"benchmark.augment=true needs image inputs (C, H, W), not {b.input_shape}"
            )
        b.augmentation = RandomCropFlip(padding=max(1, round(b.input_shape[1] / 8)), flip=flip)
        b.info["augmentation"] = repr(b.augmentation)
    if online:
        online_stream(b, online_batch_size, b.seed)
    return b


def _split_dataset(
    name: str,
    dataset: str,
    mean: float | tuple[float, ...],
    std: float | tuple[float, ...],
    *,
    data_dir: str | None,
    augment: bool,
    online: bool,
    online_batch_size: int,
    validation: float = 0.0,
    flip: bool = True,
    path: str | None = None,
    pad: int = 0,
    normalize: bool = True,
    **split: object,
) -> Benchmark:
    """A stored dataset split by class, with the options every benchmark shares. The public
    functions below pass their arguments straight through (``**locals()``). ``pad`` and
    ``normalize``: see :func:`zero_pad`."""
    from clrun.datasets import load_dataset

    data = zero_pad(load_dataset(dataset, data_dir, path), pad)
    _check_normalize(normalize)
    if not normalize:  # pixels / 255: inputs in [0, 1]
        mean, std = 0.0, 1.0
    b = split_by_class(name, data, mean=mean, std=std, **split)
    b.info.update(pad=pad, normalize=normalize)
    return _finish(
        b,
        augment=augment,
        flip=flip,
        online=online,
        online_batch_size=online_batch_size,
        validation=validation,
    )
