"""The MNIST family: Split MNIST, Split Fashion-MNIST, Permuted MNIST and Rotated MNIST.

Split benchmarks divide the classes into experiences
(:func:`~clrun.benchmarks.core.split_by_class`). Permuted and rotated MNIST show the same digits
in every experience through a per-experience transform applied per batch on the device
(:func:`_domain_stream`): the raw images are stored once, whatever the number of experiences.
The datasets themselves come from :func:`clrun.datasets.load_dataset`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.benchmarks.core import (
    Benchmark,
    Experience,
    _as_images,
    _check_normalize,
    _check_scenario,
    _finish,
    _split_dataset,
    zero_pad,
)
from clrun.checks import Rule, int_at_least, is_int, optional, require

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def split_mnist(
    scenario: str = "class",
    n_experiences: int = 5,
    class_order: Sequence[int] | str | None = tuple(range(10)),
    seed: int = 0,
    data_dir: str | None = None,
    augment: bool = False,
    online: bool = False,
    online_batch_size: int = 10,
    validation: float = 0.0,
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
    validation: float = 0.0,
    pad: int = 0,
    normalize: bool = True,
) -> Benchmark:
    """Split Fashion-MNIST: the 10 clothing classes in experiences of disjoint classes. ``pad``
    and ``normalize`` as for :func:`split_mnist`."""
    return _split_dataset("split_fmnist", "fashion_mnist", FMNIST_MEAN, FMNIST_STD, **locals())


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
    require("benchmark.n_experiences", n_experiences, int_at_least(1))
    n_train = len(data["y_train"])
    in_train_set = Rule(
        lambda v: is_int(v) and 1 <= v <= n_train,
        f"an integer in 1..{n_train} (the training set's size)",
    )
    require("benchmark.train_samples_per_experience", train_samples, optional(in_train_set))
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
    validation: float = 0.0,
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
    b = _domain_stream(
        "permuted_mnist",
        scenario,
        n_experiences,
        data,
        _Permute(perms),
        info,
        seed,
        train_samples_per_experience,
        normalize,
    )
    return _finish(b, online=online, online_batch_size=online_batch_size, validation=validation)


def rotated_mnist(
    scenario: str = "domain",
    n_experiences: int = 10,
    degrees: Sequence[float] | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    online: bool = False,
    online_batch_size: int = 10,
    validation: float = 0.0,
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
    b = _domain_stream(
        "rotated_mnist",
        scenario,
        n_experiences,
        data,
        _Rotate(angles),
        info,
        seed,
        train_samples_per_experience,
        normalize,
    )
    return _finish(b, online=online, online_batch_size=online_batch_size, validation=validation)
