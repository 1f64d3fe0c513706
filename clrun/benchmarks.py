"""Benchmarks: streams of experiences held as tensors.

A benchmark is built once per run and moved to the run's device. Every experience holds its raw
samples in their compact dtype (uint8 images) together with targets, task labels and the index of
the experience each sample came from. Minibatches are index gathers; `Benchmark.prepare` turns a
gathered raw batch into model input on the device (per-experience domain transform such as a pixel
permutation or a rotation, then normalisation). Nothing here needs a DataLoader.

Scenarios (``benchmark.scenario``):

- ``class``: one label space over all classes, task labels are all 0.
- ``task``: same targets, but every sample carries its experience index as task label
  (train and test), so a multi-head model can route it.
- ``domain``: every experience has the same label space. Split benchmarks use the position of a
  class inside its experience (for the default order of Split MNIST: ``y mod 2``, even/odd);
  permuted and rotated MNIST keep the digit labels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
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


@dataclass
class Benchmark:
    """Train and test streams plus what a model needs to know about the inputs."""

    name: str
    scenario: str
    train_stream: list[Experience]
    test_stream: list[Experience]
    n_classes: int  # width of the label space the model predicts in
    input_shape: tuple[int, ...]  # (C, H, W) of one prepared input
    mean: float  # normalisation on the [0, 1] pixel scale
    std: float
    transform: Callable[[Tensor, Tensor], Tensor] | None = None  # (x float 0..255, e) → x
    info: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Benchmark:
        self.train_stream = [ex.to(device) for ex in self.train_stream]
        self.test_stream = [ex.to(device) for ex in self.test_stream]
        if hasattr(self.transform, "to"):
            self.transform = self.transform.to(device)
        return self

    def prepare(self, x: Tensor, e: Tensor, train: bool = False) -> Tensor:
        """Raw gathered batch → normalised float model input, on x's device. ``train=True``
        (the training step) also applies the benchmark's augmentation, if it has one."""
        x = x.float()
        if self.transform is not None:
            x = self.transform(x, e)
        return x.sub_(255.0 * self.mean).mul_(1.0 / (255.0 * self.std))


# --------------------------------------------------------------------------- splitting by class


def _check_class_order(class_order: Sequence[int] | None, n_classes: int, seed: int) -> list[int]:
    if class_order is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(n_classes, generator=g).tolist()
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


def split_by_class(
    name: str,
    data: dict[str, Tensor],
    *,
    scenario: str,
    n_experiences: int,
    class_order: Sequence[int] | None,
    seed: int,
    mean: float,
    std: float,
) -> Benchmark:
    """Split a labelled dataset into experiences of disjoint classes (Split MNIST & co.)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"benchmark.scenario={scenario!r} is not one of {', '.join(SCENARIOS)}")
    n_total = int(data["y_train"].max()) + 1
    if not 1 <= n_experiences <= n_total or n_total % n_experiences:
        raise ValueError(
            f"benchmark.n_experiences={n_experiences} must divide the {n_total} classes of {name}"
        )
    order = _check_class_order(class_order, n_total, seed)
    per_exp = n_total // n_experiences
    exp_of_class = torch.empty(n_total, dtype=torch.long)
    pos_in_exp = torch.empty(n_total, dtype=torch.long)
    for k, c in enumerate(order):
        exp_of_class[c], pos_in_exp[c] = k // per_exp, k % per_exp

    def stream(x: Tensor, y: Tensor) -> list[Experience]:
        y = y.long()
        exps = []
        for i in range(n_experiences):
            idx = torch.nonzero(exp_of_class[y] == i).squeeze(1)
            yi = pos_in_exp[y[idx]] if scenario == "domain" else y[idx]
            ti = torch.full_like(yi, i if scenario == "task" else 0)
            exps.append(Experience(i, _as_images(x[idx]), yi, ti, torch.full_like(yi, i)))
        return exps

    return Benchmark(
        name=name,
        scenario=scenario,
        train_stream=stream(data["x_train"], data["y_train"]),
        test_stream=stream(data["x_test"], data["y_test"]),
        n_classes=per_exp if scenario == "domain" else n_total,
        input_shape=tuple(_as_images(data["x_train"][:1]).shape[1:]),
        mean=mean,
        std=std,
        info={"class_order": order, "classes_per_experience": per_exp},
    )


def _as_images(x: Tensor) -> Tensor:
    """(N, H, W) → (N, 1, H, W); (N, C, H, W) unchanged. Keeps the dtype."""
    return x.unsqueeze(1) if x.dim() == 3 else x


# --------------------------------------------------------------------------- benchmark options


def synthetic(
    scenario: str = "class",
    n_experiences: int = 5,
    n_classes: int = 10,
    class_order: Sequence[int] | None = None,
    train_per_class: int = 200,
    test_per_class: int = 50,
    image_size: int = 8,
    noise: float = 40.0,
    seed: int = 0,
) -> Benchmark:
    """Generated class-incremental data: each class is a random uint8 prototype image plus
    Gaussian pixel noise. Learnable in a few steps, no download; for tests and smoke runs."""
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
    data = {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    return split_by_class(
        "synthetic",
        data,
        scenario=scenario,
        n_experiences=n_experiences,
        class_order=class_order,
        seed=seed,
        mean=0.5,
        std=0.3,
    )


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def split_mnist(
    scenario: str = "class",
    n_experiences: int = 5,
    class_order: Sequence[int] | None = tuple(range(10)),
    seed: int = 0,
    data_dir: str | None = None,
) -> Benchmark:
    """Split MNIST: the 10 digits in ``n_experiences`` experiences of disjoint classes."""
    from clrun.datasets import load_dataset

    data = load_dataset("mnist", data_dir)
    return split_by_class(
        "split_mnist",
        data,
        scenario=scenario,
        n_experiences=n_experiences,
        class_order=class_order,
        seed=seed,
        mean=MNIST_MEAN,
        std=MNIST_STD,
    )


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
        grid = torch.nn.functional.affine_grid(self.theta[e], list(x.shape), align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, align_corners=False)


def _domain_stream(
    name: str,
    scenario: str,
    n_experiences: int,
    data: dict[str, Tensor],
    transform: torch.nn.Module,
    info: dict,
) -> Benchmark:
    """The same data in every experience, seen through a per-experience transform. The raw
    tensors are shared by all experiences: memory does not grow with ``n_experiences``."""
    if scenario not in SCENARIOS:
        raise ValueError(f"benchmark.scenario={scenario!r} is not one of {', '.join(SCENARIOS)}")
    if n_experiences < 1:
        raise ValueError(f"benchmark.n_experiences={n_experiences} must be ≥ 1")
    n_digits = int(data["y_train"].max()) + 1

    def stream(x: Tensor, y: Tensor) -> list[Experience]:
        x, y = _as_images(x), y.long()
        exps = []
        for i in range(n_experiences):
            yi = y + n_digits * i if scenario == "class" else y
            ti = torch.full_like(y, i if scenario == "task" else 0)
            exps.append(Experience(i, x, yi, ti, torch.full_like(y, i)))
        return exps

    return Benchmark(
        name=name,
        scenario=scenario,
        train_stream=stream(data["x_train"], data["y_train"]),
        test_stream=stream(data["x_test"], data["y_test"]),
        n_classes=n_digits * n_experiences if scenario == "class" else n_digits,
        input_shape=tuple(_as_images(data["x_train"][:1]).shape[1:]),
        mean=MNIST_MEAN,
        std=MNIST_STD,
        transform=transform,
        info=info,
    )


def permuted_mnist(
    scenario: str = "domain",
    n_experiences: int = 10,
    seed: int = 0,
    data_dir: str | None = None,
) -> Benchmark:
    """Permuted MNIST: every experience applies its own fixed random pixel permutation."""
    from clrun.datasets import load_dataset

    data = load_dataset("mnist", data_dir)
    g = torch.Generator().manual_seed(seed)
    n_pix = data["x_train"][0].numel()
    perms = torch.stack([torch.randperm(n_pix, generator=g) for _ in range(max(n_experiences, 0))])
    return _domain_stream(
        "permuted_mnist", scenario, n_experiences, data, _Permute(perms), {"seed": seed}
    )


def rotated_mnist(
    scenario: str = "domain",
    n_experiences: int = 10,
    degrees: Sequence[float] | None = None,
    seed: int = 0,
    data_dir: str | None = None,
) -> Benchmark:
    """Rotated MNIST: every experience rotates the digits by its own angle. ``degrees`` fixes
    the angles (one per experience); null draws them uniformly from [0, 180) with ``seed``."""
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
    return _domain_stream("rotated_mnist", scenario, n_experiences, data, _Rotate(angles), info)
