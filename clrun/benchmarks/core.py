"""Benchmarks: streams of experiences held as tensors.

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

Augmentation (``benchmark.augment``): a random crop with zero padding (H/8 pixels: 4 at 32×32)
and a random horizontal flip (not for digits), drawn for the whole batch at once from a
``torch.Generator`` the benchmark owns (seeded with ``benchmark.seed``). Its state is in
``Benchmark.state_dict()``, which a checkpoint must hold for a resumed run to stay bit-identical.

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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

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


class RandomCropFlip:
    """Random crop with zero padding and random horizontal flip for a whole (B, C, H, W) batch:
    one gather on the device, no per-sample Python loop. Offsets and flips are drawn on the CPU
    from the given generator, so results are the same on every device."""

    def __init__(self, padding: int = 4, flip: bool = True):
        if padding < 0:
            raise ValueError(f"augmentation padding={padding} must be ≥ 0")
        self.padding, self.flip = int(padding), bool(flip)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, c, h, w = x.shape
        p = self.padding
        offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
        flips = torch.randint(0, 2, (b,), generator=generator).bool() if self.flip else None
        rows = offsets[0, :, None] + torch.arange(h)  # (B, H): padded row of each output row
        cols = offsets[1, :, None] + torch.arange(w)  # (B, W)
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        index = rows[:, :, None] * (w + 2 * p) + cols[:, None, :]  # (B, H, W) into the padded
        index = index.to(x.device, non_blocking=True).view(b, 1, h * w).expand(b, c, h * w)
        padded = F.pad(x, (p, p, p, p)) if p else x
        return padded.flatten(2).gather(2, index).view(b, c, h, w)


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

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)
        self._norm: dict = {}  # (device, ndim) → (shift, scale), built on first use
        n_in = self.input_shape[0]
        for key in ("mean", "std"):
            value = getattr(self, key)
            values = list(value) if isinstance(value, Sequence) else [value]
            if len(values) not in (1, n_in):
                raise ValueError(
                    f"benchmark.{key} has {len(values)} values; give one, or one per channel "
                    f"({n_in}) of inputs shaped {tuple(self.input_shape)}"
                )
            if key == "std" and min(values) <= 0:
                raise ValueError(f"benchmark.std={value} must be > 0")

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
        shift, scale = self._normalizer(x)
        return x.sub_(shift).mul_(scale)

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

    def state_dict(self) -> dict:
        """The benchmark's random state (its augmentation generator): checkpoint it."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


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


NAMED_CLASS_ORDERS = {"vandeven": vandeven_class_order}


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
            if scenario == "task" and t is not None:
                ti = t[idx].long()
            else:
                ti = torch.full_like(yi, i if scenario == "task" else 0)
            xi = _as_images(x.index_select(0, idx))  # 2-5x faster than x[idx] on images
            exps.append(Experience(i, xi, yi, ti, torch.full_like(yi, i)))
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


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"benchmark.scenario={scenario!r} is not one of {', '.join(SCENARIOS)}")


def _tuple_or_float(v: float | Sequence[float]) -> float | tuple[float, ...]:
    return tuple(float(a) for a in v) if isinstance(v, Sequence) else float(v)


def _as_images(x: Tensor) -> Tensor:
    """(N, H, W) → (N, 1, H, W); (N, C, H, W) and flat (N, D) unchanged. Keeps the dtype."""
    return x.unsqueeze(1) if x.dim() == 3 else x


def online_stream(benchmark: Benchmark, batch_size: int, seed: int) -> Benchmark:
    """Cut every training experience into mini-experiences of ``batch_size`` samples (the last
    one may be smaller), in an order shuffled with ``seed``; the test stream is unchanged.

    Mini-experiences are views of one shuffled copy per experience (no per-batch copies); raw
    data that several experiences share (permuted MNIST) is shuffled once and stays shared.
    Each mini-experience is indexed by its position in the new train stream; its samples keep
    their original experience in ``e`` (domain transforms, buffers grouped by experience) and
    their task labels in ``t``. ``benchmark.train_origin`` maps it to the original experience."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"benchmark.online_batch_size={batch_size!r} must be an integer ≥ 1")
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


def _finish(
    b: Benchmark,
    *,
    augment: bool = False,
    flip: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
) -> Benchmark:
    """Apply the options every benchmark shares: augmentation, online stream."""
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


# --------------------------------------------------------------------------- benchmark options


def synthetic(
    scenario: str = "class",
    n_experiences: int = 5,
    n_classes: int = 10,
    class_order: Sequence[int] | str | None = None,
    train_per_class: int = 200,
    test_per_class: int = 50,
    image_size: int = 8,
    noise: float = 40.0,
    seed: int = 0,
    augment: bool = False,
    online: bool = False,
    online_batch_size: int = 10,
    pad: int = 0,
    normalize: bool = True,
) -> Benchmark:
    """Generated class-incremental data: each class is a random uint8 prototype image plus
    Gaussian pixel noise. Learnable in a few steps, no download; for tests and smoke runs.
    ``pad`` and ``normalize`` as for :func:`split_mnist`."""
    if n_classes < 2 or train_per_class < 1 or test_per_class < 1 or image_size < 1:
        raise ValueError(
            "benchmark: n_classes must be ≥ 2, train/test_per_class and image_size ≥ 1"
        )
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(n_classes, 1, image_size, image_size, generator=g) * 255

    def sample(per_class: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n_classes).repeat_interleave(per_class)
        x = protos[y] + noise * torch.randn(len(y), 1, image_size, image_size, generator=g)
        return x.clamp_(0, 255).round_().to(torch.uint8), y

    x_tr, y_tr = sample(train_per_class)
    x_te, y_te = sample(test_per_class)
    data = zero_pad({"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}, pad)
    _check_normalize(normalize)
    b = split_by_class(
        "synthetic",
        data,
        scenario=scenario,
        n_experiences=n_experiences,
        class_order=class_order,
        seed=seed,
        mean=0.5 if normalize else 0.0,
        std=0.3 if normalize else 1.0,
    )
    return _finish(b, augment=augment, online=online, online_batch_size=online_batch_size)


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
# Per-channel statistics of the training images (R, G, B), on the [0, 1] scale.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


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
        b, augment=augment, flip=flip, online=online, online_batch_size=online_batch_size
    )


def zero_pad(data: dict[str, Tensor], pad: int) -> dict[str, Tensor]:
    """The dataset with ``pad`` black (zero) pixels added on every side of every image, once, in
    its stored dtype: ``pad=2`` turns MNIST's 28×28 into the 32×32 of van de Ven et al.'s
    protocols (``transforms.Pad(2)``). Normalisation (``normalize=false``: pixels / 255, in [0, 1],
    as theirs) comes after, per batch; the padding is black before it, whatever the mean."""
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise ValueError(f"benchmark.pad={pad!r} must be an integer ≥ 0 (pixels per side)")
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
    if not isinstance(normalize, bool):
        raise ValueError(f"benchmark.normalize={normalize!r} must be true or false")


def split_mnist(
    scenario: str = "class",
    n_experiences: int = 5,
    class_order: Sequence[int] | str | None = tuple(range(10)),
    seed: int = 0,
    data_dir: str | None = None,
    augment: bool = False,
    online: bool = False,
    online_batch_size: int = 10,
    pad: int = 0,
    normalize: bool = True,
) -> Benchmark:
    """Split MNIST: the 10 digits in ``n_experiences`` experiences of disjoint classes. ``pad``
    zero pixels on every side (2: 32×32); ``normalize=False``: pixels in [0, 1] instead of
    standardised with MNIST's mean and std."""
    # no flips when augmenting: a mirrored digit is another symbol
    return _split_dataset("split_mnist", "mnist", MNIST_MEAN, MNIST_STD, flip=False, **locals())


def split_fmnist(
    scenario: str = "class",
    n_experiences: int = 5,
    class_order: Sequence[int] | str | None = tuple(range(10)),
    seed: int = 0,
    data_dir: str | None = None,
    augment: bool = False,
    online: bool = False,
    online_batch_size: int = 10,
    pad: int = 0,
    normalize: bool = True,
) -> Benchmark:
    """Split Fashion-MNIST: the 10 clothing classes in experiences of disjoint classes. ``pad``
    and ``normalize`` as for :func:`split_mnist`."""
    return _split_dataset("split_fmnist", "fashion_mnist", FMNIST_MEAN, FMNIST_STD, **locals())


def split_cifar10(
    scenario: str = "class",
    n_experiences: int = 5,
    class_order: Sequence[int] | str | None = tuple(range(10)),
    seed: int = 0,
    data_dir: str | None = None,
    path: str | None = None,
    augment: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
) -> Benchmark:
    """Split CIFAR-10: the 10 classes in ``n_experiences`` experiences (5×2 by default)."""
    return _split_dataset("split_cifar10", "cifar10", CIFAR10_MEAN, CIFAR10_STD, **locals())


def split_cifar100(
    scenario: str = "class",
    n_experiences: int = 10,
    first_experience_classes: int | None = None,
    labels: str = "fine",
    class_order: Sequence[int] | str | None = None,
    seed: int = 1993,
    data_dir: str | None = None,
    path: str | None = None,
    augment: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
) -> Benchmark:
    """Split CIFAR-100: 100 fine classes (or the 20 superclasses, ``labels="coarse"``) in
    ``n_experiences`` experiences: 10×10 by default, 20×5 with 20, or ``first_experience_classes``
    in the first and the rest split evenly (50 and 6: 50 + 5×10). A null ``class_order`` is
    ``numpy.random.RandomState(seed).permutation``: with seed 1993, the order of iCaRL, PyCIL
    and FACIL."""
    from clrun.datasets import load_dataset

    if labels not in ("fine", "coarse"):
        raise ValueError(f"benchmark.labels={labels!r} is not one of fine, coarse")
    data = load_dataset("cifar100", data_dir, path)
    if labels == "coarse":
        data = {**data, "y_train": data["y_train_coarse"], "y_test": data["y_test_coarse"]}
    n = 100 if labels == "fine" else 20
    if class_order is None:
        class_order = np.random.RandomState(seed).permutation(n).tolist()
    b = split_by_class(
        "split_cifar100",
        data,
        scenario=scenario,
        n_experiences=n_experiences,
        class_order=class_order,
        seed=seed,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        first_experience_classes=first_experience_classes,
        n_classes=n,
    )
    b.info["labels"] = labels
    return _finish(b, augment=augment, online=online, online_batch_size=online_batch_size)


class _Permute(torch.nn.Module):
    """Per-sample pixel permutation chosen by the sample's experience: one gather per batch."""

    def __init__(self, perms: Tensor):
        super().__init__()
        self.register_buffer("perms", perms)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        flat = x.flatten(1)
        return flat.gather(1, self.perms[e]).view_as(x)


class _Rotate(torch.nn.Module):
    """Per-sample rotation by the angle of the sample's experience (bilinear, zero fill)."""

    def __init__(self, degrees: Tensor):
        super().__init__()
        rad = degrees * (math.pi / 180.0)
        cos, sin, zero = rad.cos(), rad.sin(), torch.zeros_like(rad)
        theta = torch.stack(
            [torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1
        )
        self.register_buffer("theta", theta)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        grid = F.affine_grid(self.theta[e], list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, align_corners=False)


def _domain_stream(
    name: str,
    scenario: str,
    n_experiences: int,
    data: dict[str, Tensor],
    transform: torch.nn.Module,
    info: dict,
    seed: int,
    train_samples: int | None = None,
    normalize: bool = True,
) -> Benchmark:
    """The same data in every experience, seen through a per-experience transform. The raw
    tensors are shared by all experiences: memory does not grow with ``n_experiences``.
    ``train_samples``: each experience trains on its own seeded random subset of that many
    training samples instead (GEM's MNIST protocol: 1000), a copy of that size each.
    ``normalize=False``: pixels / 255, in [0, 1], instead of MNIST's mean/std standardisation
    (applied after the transform: a rotation's zero fill stays black either way)."""
    _check_scenario(scenario)
    _check_normalize(normalize)
    if n_experiences < 1:
        raise ValueError(f"benchmark.n_experiences={n_experiences} must be ≥ 1")
    n_train = len(data["y_train"])
    if train_samples is not None and (
        isinstance(train_samples, bool) or not isinstance(train_samples, int)
        or not 1 <= train_samples <= n_train
    ):  # fmt: skip
        raise ValueError(f"benchmark.train_samples_per_experience={train_samples!r} must be null "
                         f"or an integer in 1..{n_train} (the training set's size)")  # fmt: skip
    n_digits = int(data["y_train"].max()) + 1
    g = torch.Generator().manual_seed(seed + 1)  # the subsets (the transforms use ``seed``)

    def stream(x: Tensor, y: Tensor, subset: int | None = None) -> list[Experience]:
        x, y = _as_images(x), y.long()
        exps = []
        for i in range(n_experiences):
            xi, yi = x, y
            if subset is not None:
                idx = torch.randperm(len(y), generator=g)[:subset]
                xi, yi = x.index_select(0, idx), y.index_select(0, idx)
            ti = torch.full_like(yi, i if scenario == "task" else 0)
            yi = yi + n_digits * i if scenario == "class" else yi
            exps.append(Experience(i, xi, yi, ti, torch.full_like(yi, i)))
        return exps

    return Benchmark(
        name=name,
        scenario=scenario,
        train_stream=stream(data["x_train"], data["y_train"], train_samples),
        test_stream=stream(data["x_test"], data["y_test"]),
        n_classes=n_digits * n_experiences if scenario == "class" else n_digits,
        input_shape=tuple(_as_images(data["x_train"][:1]).shape[1:]),
        mean=MNIST_MEAN if normalize else 0.0,
        std=MNIST_STD if normalize else 1.0,
        transform=transform,
        info={**info, "normalize": normalize},
        seed=seed,
    )


def permuted_mnist(
    scenario: str = "domain",
    n_experiences: int = 10,
    seed: int = 0,
    data_dir: str | None = None,
    online: bool = False,
    online_batch_size: int = 10,
    train_samples_per_experience: int | None = None,
    normalize: bool = True,
    pad: int = 0,
) -> Benchmark:
    """Permuted MNIST: every experience applies its own fixed random pixel permutation.
    ``train_samples_per_experience``: each experience trains on its own random subset of that
    many samples (null: all 60,000). ``normalize=False``: pixels / 255, in [0, 1] (as GEM's and
    A-GEM's code), instead of the standardisation with MNIST's mean and std. ``pad``: black
    pixels added on every side before permuting (van de Ven & Tolias: 2, 32×32 = 1024 pixels)."""
    from clrun.datasets import load_dataset

    data = zero_pad(load_dataset("mnist", data_dir), pad)
    g = torch.Generator().manual_seed(seed)
    n_pix = data["x_train"][0].numel()
    perms = torch.stack([torch.randperm(n_pix, generator=g) for _ in range(max(n_experiences, 0))])
    info = {"seed": seed, "pad": pad}
    b = _domain_stream("permuted_mnist", scenario, n_experiences, data, _Permute(perms), info,
                       seed, train_samples_per_experience, normalize)  # fmt: skip
    return _finish(b, online=online, online_batch_size=online_batch_size)


def rotated_mnist(
    scenario: str = "domain",
    n_experiences: int = 10,
    degrees: Sequence[float] | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    online: bool = False,
    online_batch_size: int = 10,
    train_samples_per_experience: int | None = None,
    normalize: bool = True,
) -> Benchmark:
    """Rotated MNIST: every experience rotates the digits by its own angle. ``degrees`` fixes
    the angles (one per experience); null draws them uniformly from [0, 180) with ``seed``.
    ``train_samples_per_experience`` and ``normalize`` as for :func:`permuted_mnist`."""
    from clrun.datasets import load_dataset

    if degrees is None:
        g = torch.Generator().manual_seed(seed)
        angles = torch.rand(max(n_experiences, 0), generator=g) * 180.0
    else:
        if len(degrees) != n_experiences:
            raise ValueError(
                f"benchmark.degrees has {len(degrees)} angles; "
                f"benchmark.n_experiences={n_experiences} needs one per experience"
            )
        angles = torch.tensor([float(a) for a in degrees])
    data = load_dataset("mnist", data_dir)
    info = {"degrees": [round(a, 2) for a in angles.tolist()]}
    b = _domain_stream("rotated_mnist", scenario, n_experiences, data, _Rotate(angles), info,
                       seed, train_samples_per_experience, normalize)  # fmt: skip
    return _finish(b, online=online, online_batch_size=online_batch_size)


# --------------------------------------------------------------------------- your own data

FILE_KEYS = ("x", "y", "t", "exp")


def read_arrays(path: str | Path, what: str = "benchmark.path") -> dict[str, Tensor]:
    """``x``, ``y`` and the optional ``t`` and ``exp`` of a ``.npz`` (numpy, no pickles) or
    ``.pt`` file (a dict of tensors, loaded with ``weights_only=True``), as CPU tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{what}={str(path)!r}: no such file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}
    elif path.suffix in (".pt", ".pth"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unreadable or unsafe file
            first = " ".join(str(e).split())[:200]
            raise ValueError(
                f"{what}={str(path)!r} cannot be read with torch.load(weights_only=True) "
                f"({first}); save a dict of tensors with torch.save"
            ) from None
        if not isinstance(raw, dict):
            raise ValueError(f"{what}={str(path)!r} holds a {type(raw).__name__}, not a dict")
    else:
        raise ValueError(f"{what}={str(path)!r}: expected a .npz or .pt file")
    if missing := [k for k in ("x", "y") if k not in raw]:
        raise ValueError(
            f"{what}={str(path)!r} has no {' or '.join(map(repr, missing))}; it holds "
            f"{sorted(raw)}, and needs x (inputs), y (integer labels), optionally t (task "
            "labels) and exp (experience of each sample)"
        )
    out = {}
    for k in FILE_KEYS:
        if k in raw:
            v = raw[k]
            out[k] = v.cpu() if isinstance(v, Tensor) else torch.from_numpy(np.asarray(v))
    n = len(out["x"])
    for k, v in out.items():
        if v.dim() == 0 or len(v) != n:
            raise ValueError(f"{what}: {k} has shape {tuple(v.shape)}, not {n} rows like x")
        if k != "x" and (v.dim() != 1 or v.is_floating_point() or v.dtype == torch.bool):
            raise ValueError(
                f"{what}: {k} must be a 1-D integer array, not {v.dtype} {tuple(v.shape)}"
            )
    x = out["x"]
    if x.dim() not in (2, 3, 4):
        raise ValueError(
            f"{what}: x has shape {tuple(x.shape)}; expected (N, C, H, W) or (N, H, W) images "
            "or (N, D) vectors"
        )
    if x.dim() == 4 and x.shape[1] > 4 and x.shape[3] <= 4:
        raise ValueError(
            f"{what}: x has shape {tuple(x.shape)}, which looks channels-last; store images "
            "as (N, C, H, W) (numpy: x.transpose(0, 3, 1, 2))"
        )
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"{what}: x is {x.dtype}; store images as uint8 (0..255) or floats")
    if x.is_floating_point():
        out["x"] = x.float()
    return out


def _holdout(
    data: dict[str, Tensor], fraction: float, seed: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    if not 0 < fraction < 1:
        raise ValueError(f"benchmark.test_fraction={fraction} must be in (0, 1)")
    n = len(data["y"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * fraction))
    return (
        {k: v[perm[n_test:]] for k, v in data.items()},
        {k: v[perm[:n_test]] for k, v in data.items()},
    )


def _relabel(train: Tensor, test: Tensor, what: str) -> tuple[Tensor, Tensor, list[int]]:
    """Map the values of ``train`` to 0..K-1 (sorted); ``test`` may only use values in it."""
    train, test = train.contiguous(), test.contiguous()
    values = torch.unique(train)
    unseen = sorted(set(torch.unique(test).tolist()) - set(values.tolist()))
    if unseen:
        raise ValueError(f"the test file has {what} {unseen[:10]} that the training file has not")
    return (
        torch.searchsorted(values, train),
        torch.searchsorted(values, test),
        values.tolist(),
    )


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (images) or per-feature (vectors) mean and std of x, in chunks."""
    dims = [0] + list(range(2, x.dim()))
    total = sq = None
    count = 0
    for chunk in x.split(4096):
        c = chunk.double()
        s, s2 = c.sum(dims), (c * c).sum(dims)
        total = s if total is None else total + s
        sq = s2 if sq is None else sq + s2
        count += c.numel() // c.shape[1]
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def from_files(
    path: str | None = None,
    test_path: str | None = None,
    test_fraction: float = 0.2,
    split_by: str = "class",
    scenario: str = "class",
    n_experiences: int = 5,
    first_experience_classes: int | None = None,
    class_order: Sequence[int] | str | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    seed: int = 0,
    augment: bool = False,
    online: bool = False,
    online_batch_size: int = 10,
) -> Benchmark:
    """Your own arrays as a benchmark: ``path`` (and ``test_path``, or a seeded ``test_fraction``
    of ``path`` held out) are ``.npz`` / ``.pt`` files with ``x`` (uint8 0..255 or float inputs:
    images (N, C, H, W) or (N, H, W), or vectors (N, D)), ``y`` (integer labels, any values:
    they are mapped to 0..K-1 in sorted order), optionally ``t`` (task labels, used in the
    ``task`` scenario instead of the experience index) and ``exp`` (the experience of each
    sample). ``split_by=class`` splits by class like the Split benchmarks; ``split_by=column``
    uses ``exp`` (its sorted values are the experience order). ``mean``/``std`` default to the
    per-channel (per-feature) statistics of the training inputs."""
    if path is None:
        raise ValueError(
            "benchmark=from_files needs benchmark.path=<file.npz or file.pt> holding x and y "
            "(see conf/benchmark/from_files.yaml)"
        )
    if split_by not in ("class", "column"):
        raise ValueError(f"benchmark.split_by={split_by!r} is not one of class, column")
    _check_scenario(scenario)
    train = read_arrays(path, "benchmark.path")
    if test_path is not None:
        test = read_arrays(test_path, "benchmark.test_path")
    else:
        train, test = _holdout(train, test_fraction, seed)
    if train["x"].shape[1:] != test["x"].shape[1:] or train["x"].dtype != test["x"].dtype:
        raise ValueError(
            f"benchmark.test_path: x is {test['x'].dtype} {tuple(test['x'].shape[1:])} per "
            f"sample, the training x {train['x'].dtype} {tuple(train['x'].shape[1:])}"
        )
    y_tr, y_te, label_values = _relabel(train["y"].long(), test["y"].long(), "labels")
    data = {"x_train": train["x"], "y_train": y_tr, "x_test": test["x"], "y_test": y_te}
    if "t" in train and scenario == "task":
        if "t" not in test:
            raise ValueError("benchmark.test_path has no t (task labels) but the training file has")
        data["t_train"], data["t_test"] = train["t"].long(), test["t"].long()
    pixel_scale = 255.0 if train["x"].dtype == torch.uint8 else 1.0
    if mean is None or std is None:  # statistics of the training inputs, on the [0, 1] scale
        m, s = _channel_stats(_as_images(train["x"]))
        mean = tuple(v / pixel_scale for v in m) if mean is None else mean
        std = tuple(v / pixel_scale for v in s) if std is None else std
    if split_by == "class":
        b = split_by_class(
            "from_files",
            data,
            scenario=scenario,
            n_experiences=n_experiences,
            class_order=class_order,
            seed=seed,
            mean=mean,
            std=std,
            first_experience_classes=first_experience_classes,
            n_classes=len(label_values),
            pixel_scale=pixel_scale,
        )
    else:
        if "exp" not in train or "exp" not in test:
            raise ValueError(
                "benchmark.split_by=column needs exp (the experience of each sample) in the "
                "training and in the test file"
            )
        e_tr, e_te, exp_values = _relabel(train["exp"].long(), test["exp"].long(), "exp values")
        if len(exp_values) != n_experiences:
            raise ValueError(
                f"benchmark.n_experiences={n_experiences}, but the exp column has "
                f"{len(exp_values)} experiences: set benchmark.n_experiences={len(exp_values)}"
            )
        b = split_by_column(
            "from_files",
            {**data, "e_train": e_tr, "e_test": e_te},
            scenario=scenario,
            n_classes=len(label_values),
            mean=mean,
            std=std,
            seed=seed,
            pixel_scale=pixel_scale,
        )
        b.info["exp_values"] = exp_values
    if empty := [ex.index for ex in b.test_stream if len(ex) == 0]:
        raise ValueError(
            f"benchmark=from_files: test experiences {empty} have no samples; every experience "
            "needs test samples (check the test file's classes or exp column)"
        )
    b.info.update(path=str(path), label_values=label_values, split_by=split_by)
    return _finish(b, augment=augment, online=online, online_batch_size=online_batch_size)


def split_by_column(
    name: str,
    data: dict[str, Tensor],
    *,
    scenario: str,
    n_classes: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    seed: int = 0,
    pixel_scale: float = 255.0,
) -> Benchmark:
    """Experiences given by ``e_train`` / ``e_test`` (0..E-1 per sample). Labels keep one label
    space in every scenario; the scenario decides the task labels (``t_*`` if given, else the
    experience index, in ``task``; 0 otherwise)."""
    _check_scenario(scenario)
    n_experiences = int(data["e_train"].max()) + 1

    def stream(x: Tensor, y: Tensor, e: Tensor, t: Tensor | None) -> list[Experience]:
        exps = []
        for i in range(n_experiences):
            idx = torch.nonzero(e == i).squeeze(1)
            yi = y[idx].long()
            if scenario == "task" and t is not None:
                ti = t[idx].long()
            else:
                ti = torch.full_like(yi, i if scenario == "task" else 0)
            xi = _as_images(x.index_select(0, idx))  # 2-5x faster than x[idx] on images
            exps.append(Experience(i, xi, yi, ti, torch.full_like(yi, i)))
        return exps

    return Benchmark(
        name=name,
        scenario=scenario,
        train_stream=stream(data["x_train"], data["y_train"], data["e_train"], data.get("t_train")),
        test_stream=stream(data["x_test"], data["y_test"], data["e_test"], data.get("t_test")),
        n_classes=n_classes,
        input_shape=tuple(_as_images(data["x_train"][:1]).shape[1:]),
        mean=_tuple_or_float(mean),
        std=_tuple_or_float(std),
        seed=seed,
        pixel_scale=pixel_scale,
    )


def image_folder(
    path: str | None = None,
    image_size: int = 32,
    test_fraction: float = 0.2,
    scenario: str = "class",
    n_experiences: int = 5,
    first_experience_classes: int | None = None,
    class_order: Sequence[int] | str | None = None,
    seed: int = 0,
    augment: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
) -> Benchmark:
    """Class-per-folder image trees (``path/<class>/<image>``; or ``path/train/<class>/...`` and
    ``path/test/<class>/...`` (or ``val``)), read with torchvision's ``ImageFolder``, resized
    (shorter side) and centre-cropped to ``image_size``, held in memory as uint8 and split by
    class. Needs torchvision (the ``vision`` extra)."""
    from clrun.datasets import require_torchvision

    tv = require_torchvision("benchmark=image_folder")
    if path is None:
        raise ValueError("benchmark=image_folder needs benchmark.path=<folder of class folders>")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"benchmark.path={str(root)!r} is not a folder")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    train_dir = root / "train" if test_dir is not None and (root / "train").is_dir() else root
    T = tv.transforms
    load = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])

    def read(folder: Path) -> tuple[dict[str, Tensor], list[str]]:
        ds = tv.datasets.ImageFolder(str(folder), transform=load)  # decodes to RGB
        xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
        return {"x": torch.stack(xs), "y": torch.tensor(ys)}, ds.classes

    train, classes = read(train_dir)
    if test_dir is not None:
        test, test_classes = read(test_dir)
        if test_classes != classes:
            raise ValueError(f"{test_dir} has class folders {test_classes}, {train_dir} {classes}")
    else:
        train, test = _holdout(train, test_fraction, seed)
    m, s = _channel_stats(train["x"])
    data = {"x_train": train["x"], "y_train": train["y"], "x_test": test["x"], "y_test": test["y"]}
    b = split_by_class(
        "image_folder",
        data,
        scenario=scenario,
        n_experiences=n_experiences,
        class_order=class_order,
        seed=seed,
        mean=tuple(v / 255 for v in m),
        std=tuple(v / 255 for v in s),
        first_experience_classes=first_experience_classes,
        n_classes=len(classes),
    )
    b.info.update(path=str(root), classes=classes)
    return _finish(b, augment=augment, online=online, online_batch_size=online_batch_size)
