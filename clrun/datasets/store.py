"""What every dataset shares: the array keys, the cache and its checks, trying sources in
order, downloads, and the error raised when every source failed.

Cache. Arrays live in ``<data_dir>/<name>/arrays.npz`` (``data_dir`` from
:func:`clrun.datasets.resolve_data_dir`), written atomically (temporary file + ``os.replace``)
together with their md5s. A load checks the arrays' md5s against the dataset's official table
(``clrun.datasets.mnist.ARRAY_MD5``, from DATA.md; for CIFAR, against the md5s the cache stored); a
cache that does not match is reported with a warning, deleted and fetched again - it is never
used silently. Hashing MNIST costs ~0.1 s a run and CIFAR ~0.4 s, so a cache verified once gets a
stamp beside it (``arrays.npz.verified``: its size, mtime and inode, and the md5s it matched) and
is not hashed again while its size, mtime and inode stay those of the stamp. What stays detected
without the hash: a cache rewritten or replaced (new mtime or inode), truncated (new size), or
damaged in place (every member of the ``.npz`` zip has a CRC-32, which numpy's reader checks on
every load). As git does for its index ("racy git"), a file modified less than ``RACY_S`` seconds
before it was verified gets no stamp, so a change within the filesystem's mtime resolution cannot
pass for the verified file.

The source modules call :func:`download_url` through this module (``store.download_url``), so
replacing it here (tests, an offline wrapper) reaches every source.
"""

import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from clrun.errors import RunFailure

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100")
KEYS = ("x_train", "y_train", "x_test", "y_test")
URL_TIMEOUT_S = 10
STAMP_SUFFIX = ".verified"  # arrays.npz.verified: the cache file as it was when last verified
RACY_S = 2.0  # a cache modified this recently is not stamped (coarse mtime resolution)
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


def md5(data: bytes | np.ndarray) -> str:
    return hashlib.md5(data.tobytes() if isinstance(data, np.ndarray) else data).hexdigest()


def check_arrays(
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
        if expected is not None and (digest := md5(np.ascontiguousarray(a))) != expected[key]:
            raise ValueError(f"{key} md5 {digest} != expected {expected[key]}")


def read_cache(
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
        check_arrays(arrays, None if verified else expected, keys)
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


def write_cache(path: Path, arrays: Arrays) -> None:
    """Atomic: a half-written cache never has the final name (parallel runs may race here)."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            digests = [f"{k} {md5(np.ascontiguousarray(a))}" for k, a in arrays.items()]
            np.savez(f, **arrays, md5=np.array(digests))
        tmp.chmod(0o644)  # a shared cache: temporary files are created private
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the dataset cache %s: %s", path, e)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def first_working(name: str, sources: list, check: Callable, how_to: str):
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


def download_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
        return response.read()


def run_command(cmd: list[str], cwd: Path | None = None) -> bytes:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, timeout=900, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).decode(errors="replace").strip().splitlines()
        shown = " ".join(cmd).replace(sys.executable, "python")
        raise RuntimeError(f"`{shown}` failed: {lines[-1] if lines else result.returncode}")
    return result.stdout


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
