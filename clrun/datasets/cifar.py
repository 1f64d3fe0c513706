"""CIFAR-10 and CIFAR-100: their sources, the official python archives and the readers of
their pickled batches.

No package registry carries them. Sources: (1) the official python archive
(``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) in ``<data_dir>/<name>/raw/``; (2) the
archive extracted there (``raw/cifar-10-batches-py/`` / ``raw/cifar-100-python/``); (3) the
official URL (``https://www.cs.toronto.edu/~kriz/``). ``path=`` (``benchmark.path``) replaces the
list: an archive or an extracted folder anywhere, read on every run, never cached.

Integrity policy. An *archive* must have the official md5; one that does not is refused (a clear
error naming both md5s; the next source is tried), because a download that broke half-way is the
usual cause. An *extracted folder* is checked file by file against the official md5s of its
batches (those torchvision lists); a folder whose files differ is still used, with a warning
naming the files, because a user who points at a folder may have re-pickled or subset it on
purpose. Data from such a folder is never written to the cache. The batches are Python pickles:
they are read with :class:`~clrun.datasets.store.AllowListUnpickler`, which builds only plain
containers, strings, numbers and numpy arrays (``numpy.ndarray``, ``numpy.dtype``,
``numpy.core.multiarray._reconstruct``: all the official files reference) and refuses any other
global, so a malicious file cannot run code.
"""

import io
import logging
import tarfile
from functools import partial
from pathlib import Path

import numpy as np

from clrun.datasets import store
from clrun.datasets.store import KEYS, AllowListUnpickler, Arrays, check_arrays, first_working, md5

log = logging.getLogger(__name__)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
# The official python archives, and the per-file md5s of the extracted batches as torchvision
# lists them.
CIFAR = {
    "cifar10": {
        "archive": "cifar-10-python.tar.gz",
        "archive_md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py",
        "train": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
        "test": ("test_batch",),
        "labels": {"": "labels"},  # array key suffix → label key in the pickled dicts
        "n_classes": {"labels": 10},
        "file_md5": {
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
    },
    "cifar100": {
        "archive": "cifar-100-python.tar.gz",
        "archive_md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python",
        "train": ("train",),
        "test": ("test",),
        "labels": {"": "fine_labels", "_coarse": "coarse_labels"},
        "n_classes": {"fine_labels": 100, "coarse_labels": 20},
        "file_md5": {
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        },
    },
}


def array_keys(name: str) -> tuple[str, ...]:
    """The array keys of a dataset: ``KEYS``, plus the coarse labels of CIFAR-100."""
    suffixes = [sfx for sfx in CIFAR.get(name, {}).get("labels", {}) if sfx]
    return KEYS + tuple(f"y_{split}{sfx}" for sfx in suffixes for split in ("train", "test"))


def fetch_cifar(name: str, raw: Path, path: Path | None = None) -> tuple[Arrays, bool]:
    """(arrays, verified): from ``path`` alone when given, else from the first working source."""
    spec = CIFAR[name]
    if path is not None:
        sources = [(f"benchmark.path={path}", partial(_cifar_from_path, name, path))]
    else:
        archive = raw / spec["archive"]
        sources = [
            (f"official archive {archive}", partial(_cifar_from_path, name, archive)),
            (f"extracted archive in {raw}", partial(_cifar_from_path, name, raw)),
            (f"official URL {CIFAR_URL}{spec['archive']}", partial(_cifar_from_url, name)),
        ]
    check = partial(check_arrays, expected=None, keys=array_keys(name))
    return first_working(name, sources, check, how_to_provide(name, raw))


def _cifar_from_path(name: str, path: Path) -> tuple[Arrays, bool]:
    """An official archive (md5 must match) or an extracted folder (md5 mismatch: a warning)."""
    spec = CIFAR[name]
    if path.is_dir():
        return _cifar_from_folder(name, path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    data = path.read_bytes()
    if (digest := md5(data)) != spec["archive_md5"]:
        raise ValueError(
            f"{path} has md5 {digest}, not the official {spec['archive_md5']} of "
            f"{spec['archive']}: the archive is damaged (an interrupted download?) or not the "
            f"official one. Download it again from {CIFAR_URL}{spec['archive']}, or extract it "
            "and point benchmark.path at the folder to use it anyway (with a warning)"
        )
    return _cifar_from_archive(name, data), True


def _cifar_from_url(name: str) -> tuple[Arrays, bool]:
    return _cifar_from_archive(name, store.download_url(CIFAR_URL + CIFAR[name]["archive"])), True


def _cifar_from_archive(name: str, data: bytes) -> Arrays:
    """Arrays from the official ``.tar.gz`` (its md5 checked first, wherever it came from)."""
    spec = CIFAR[name]
    if (digest := md5(data)) != spec["archive_md5"]:
        raise ValueError(f"{spec['archive']} md5 {digest} != expected {spec['archive_md5']}")
    wanted = {f"{spec['folder']}/{f}": f for f in (*spec["train"], *spec["test"])}
    blobs = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for info in tar:
            if info.isfile() and (f := wanted.get(info.name.removeprefix("./"))):
                blobs[f] = tar.extractfile(info).read()
    if missing := sorted(set(wanted.values()) - set(blobs)):
        raise FileNotFoundError(f"the archive has no {', '.join(missing)} in {spec['folder']}/")
    return cifar_arrays(name, blobs)


def _cifar_from_folder(name: str, folder: Path) -> tuple[Arrays, bool]:
    """The extracted batches in ``folder`` (or in ``folder/<official folder name>``). Files
    whose md5 is not the official one are used with a warning; the result is then unverified."""
    spec = CIFAR[name]
    files = (*spec["train"], *spec["test"])
    if not (folder / files[0]).is_file() and (folder / spec["folder"]).is_dir():
        folder = folder / spec["folder"]
    if missing := [f for f in files if not (folder / f).is_file()]:
        raise FileNotFoundError(f"missing {', '.join(missing)} in {folder}")
    blobs = {f: (folder / f).read_bytes() for f in files}
    differ = [f for f, b in blobs.items() if md5(b) != spec["file_md5"][f]]
    arrays = cifar_arrays(name, blobs)
    if differ:
        log.warning(
            "%s: %s differ from the official %s files (md5); using them as given "
            "(unverified, not cached)",
            folder,
            ", ".join(differ),
            name,
        )
    return arrays, not differ


def read_cifar_batch(blob: bytes) -> dict[str, object]:
    """One pickled CIFAR batch (a dict) through the allow-list unpickler; keys as ``str``."""
    obj = AllowListUnpickler(io.BytesIO(blob), encoding="latin1").load()
    if not isinstance(obj, dict):
        raise ValueError(f"not a CIFAR batch: the pickle holds a {type(obj).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def cifar_arrays(name: str, blobs: dict[str, bytes]) -> Arrays:
    """The arrays of CIFAR-10/100 from the pickled batches (file name → bytes): images
    (N, 3, 32, 32) uint8 (the rows are channel-major 3×1024), labels uint8."""
    spec = CIFAR[name]
    arrays = {}
    for split in ("train", "test"):
        batches = [(f, read_cifar_batch(blobs[f])) for f in spec[split]]
        xs = []
        for f, b in batches:
            x = b.get("data")
            if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2):
                raise ValueError(f"{f}: 'data' is not a uint8 (N, 3072) array (keys: {sorted(b)})")
            if x.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{f}: 'data' has {x.shape[1]} columns, not 3072 (3×32×32)")
            xs.append(x)
        arrays[f"x_{split}"] = np.ascontiguousarray(np.concatenate(xs).reshape(-1, 3, 32, 32))
        for suffix, key in spec["labels"].items():
            ys = []
            for (f, b), x in zip(batches, xs, strict=True):
                if key not in b:
                    raise ValueError(f"{f}: no {key!r} in the batch (keys: {sorted(b)})")
                y = np.asarray(b[key])
                n = spec["n_classes"][key]
                if y.shape != (len(x),) or y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= n:
                    raise ValueError(f"{f}: {key!r} must be {len(x)} integer labels in 0..{n - 1}")
                ys.append(y.astype(np.uint8))
            arrays[f"y_{split}{suffix}"] = np.concatenate(ys)
    return arrays


def how_to_provide(name: str, raw: Path) -> str:
    spec = CIFAR[name]
    return (
        f"No package registry carries {name}. On a machine with internet, download "
        f"{CIFAR_URL}{spec['archive']} (md5 {spec['archive_md5']}), then either\n"
        f"    put it at {raw / spec['archive']}\n"
        f"or extract it so that {raw / spec['folder'] / spec['train'][0]} exists,\n"
        "or point benchmark.path at the archive or at the extracted folder."
    )
