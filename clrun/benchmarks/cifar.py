"""Split CIFAR-10 and Split CIFAR-100 (fine or coarse labels, iCaRL's class order, a larger
first experience). The archives come from :func:`clrun.datasets.load_dataset`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from clrun.benchmarks.core import Benchmark, _finish, _split_dataset, split_by_class
from clrun.checks import one_of, require

# Per-channel statistics of the training images (R, G, B), on the [0, 1] scale.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


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
    validation: float = 0.0,
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
    validation: float = 0.0,
) -> Benchmark:
    """Split CIFAR-100: 100 fine classes (or the 20 superclasses, ``labels="coarse"``) in
    ``n_experiences`` experiences: 10×10 by default, 20×5 with 20, or ``first_experience_classes``
    in the first and the rest split evenly (50 and 6: 50 + 5×10). A null ``class_order`` is
    ``numpy.random.RandomState(seed).permutation``: with seed 1993, the order of iCaRL, PyCIL
    and FACIL."""
    from clrun.datasets import load_dataset

    require("benchmark.labels", labels, one_of(("fine", "coarse")))
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
    return _finish(
        b,
        augment=augment,
        online=online,
        online_batch_size=online_batch_size,
        validation=validation,
    )
