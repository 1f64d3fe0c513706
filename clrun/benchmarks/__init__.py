"""Benchmarks: streams of experiences held as tensors.

Every benchmark option of ``conf/benchmark/`` is a function here that returns a
:class:`Benchmark`: train and test streams of :class:`Experience` objects (raw uint8 samples,
targets, task labels) plus the input shape and normalisation a model needs. YAML and code name
them through this package (``_target_: clrun.benchmarks.split_mnist``,
``from clrun.benchmarks import Experience``), never through the module that defines them.

What lives where:

- ``core.py``: :class:`Experience`, :func:`concat`, :class:`Benchmark` (device moves, batch
  preparation, normalisation, the augmentation generator's state), the scenarios, class orders
  (``vandeven``, ``pilot``, ``sorted``), the stream builders several datasets share (:func:`split_by_class`,
  :func:`zero_pad`, the options every benchmark shares) and the online stream
  (:func:`online_stream`).
- ``input.py``: :class:`InputSpec`, the input a model reports (size, channels, normalisation).
- ``augment.py``: batched augmentation on the device (:class:`RandomCropFlip`).
- ``mnist.py``: Split MNIST, Split Fashion-MNIST, Permuted MNIST, Rotated MNIST (and the
  per-experience pixel permutation and rotation they apply).
- ``cifar.py``: Split CIFAR-10 and Split CIFAR-100.
- ``pretrained.py``: the pre-trained track's datasets read from a user's folder, decoded once
  into a memory-mapped cache (:func:`imagenet_r`, :func:`imagenet_a`, :func:`cub200`,
  :func:`omnibenchmark`, :func:`vtab`).
- ``files.py``: your own data: ``.npz`` / ``.pt`` arrays (:func:`from_files`,
  :func:`read_arrays`, :func:`split_by_column`) and image folders (:func:`image_folder`).
- ``generated.py``: :func:`synthetic`, the generated benchmark of the tests and the ``debug``
  config (the module is not called ``synthetic.py``: it would share its dotted name with the
  function).

Where the data comes from (sources, checksums, caches) is :mod:`clrun.datasets`. A new dataset
family gets a module of its own here and a line in the imports below.
"""

from clrun.benchmarks.augment import RandomCropFlip
from clrun.benchmarks.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    split_cifar10,
    split_cifar100,
)
from clrun.benchmarks.core import (
    NAMED_CLASS_ORDERS,
    SCENARIOS,
    Benchmark,
    Experience,
    concat,
    online_stream,
    pilot_class_order,
    split_by_class,
    vandeven_class_order,
    zero_pad,
)
from clrun.benchmarks.files import FILE_KEYS, from_files, image_folder, read_arrays, split_by_column
from clrun.benchmarks.generated import synthetic
from clrun.benchmarks.input import InputSpec
from clrun.benchmarks.mnist import (
    FMNIST_MEAN,
    FMNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    permuted_mnist,
    rotated_mnist,
    split_fmnist,
    split_mnist,
)
from clrun.benchmarks.pretrained import cub200, imagenet_a, imagenet_r, omnibenchmark, vtab

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "FILE_KEYS",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "NAMED_CLASS_ORDERS",
    "SCENARIOS",
    "Benchmark",
    "Experience",
    "InputSpec",
    "RandomCropFlip",
    "concat",
    "cub200",
    "from_files",
    "image_folder",
    "imagenet_a",
    "imagenet_r",
    "omnibenchmark",
    "online_stream",
    "permuted_mnist",
    "pilot_class_order",
    "read_arrays",
    "rotated_mnist",
    "split_by_class",
    "split_by_column",
    "split_cifar10",
    "split_cifar100",
    "split_fmnist",
    "split_mnist",
    "synthetic",
    "vandeven_class_order",
    "vtab",
    "zero_pad",
]
