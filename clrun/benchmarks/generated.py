"""The generated benchmark (``benchmark=synthetic``): no download, learnable in a few steps;
the benchmark of the fast tests and the ``debug`` config."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from clrun.benchmarks.core import Benchmark, _check_normalize, _finish, split_by_class, zero_pad
from clrun.checks import int_at_least, require


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
    validation: float = 0.0,
    pad: int = 0,
    normalize: bool = True,
) -> Benchmark:
    """Generated class-incremental data: each class is a random uint8 prototype image plus
    Gaussian pixel noise. Learnable in a few steps, no download; for tests and smoke runs.
    ``pad`` and ``normalize`` as for :func:`split_mnist`."""
    require("benchmark.n_classes", n_classes, int_at_least(2))
    for key, size in (
        ("train_per_class", train_per_class),
        ("test_per_class", test_per_class),
        ("image_size", image_size),
    ):
        require(f"benchmark.{key}", size, int_at_least(1))
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
    return _finish(
        b,
        augment=augment,
        online=online,
        online_batch_size=online_batch_size,
        validation=validation,
    )
