"""Image files decoded once into a memory-mapped uint8 cache (the pre-trained track's datasets:
ImageNet-R, ImageNet-A, CUB-200, OmniBenchmark, VTAB).

Why: these datasets are tens of thousands of JPEGs; decoding them every epoch costs more than a
frozen ViT's forward pass. They are decoded once, at a fixed ``size``, into one raw file of
``(N, 3, size, size)`` uint8 rows that every later run maps with ``numpy.memmap``: nothing is
read into memory until a batch gathers its rows (ImageNet-R at 224 px is 4.5 GB).

Decoding: RGB, shorter side resized to ``size`` (bicubic), centre crop ``size × size``. Resizing
the shorter side keeps the aspect ratio (a direct resize would stretch the many non-square
images); the crop loses only the ends of the longer side. The runner resizes again on the device
to the model's input size; crops and flips for training happen there too. JPEGs are decoded with
``Image.draft`` (DCT scaling to the smallest scale still at least ``size``), which makes large
photos several times faster to decode without going below the target size. More than
``POOL_MIN`` images are decoded by a process pool; progress goes to the log.

Cache. ``<data_dir>/<dataset>/<hash of the source folder>-<size>px/images-<fingerprint>.u8``,
where the fingerprint hashes every file's relative path, size and mtime with its label and split
(:func:`fingerprint`): a file added, removed, replaced or touched gives a new name, so the cache
is rebuilt (stale files of the same folder are deleted). Files are written under a temporary
name and renamed when complete, so a half-written cache never has the final name.

Arranged copies. An experience must be a contiguous run of rows, else building it copies its
images into memory (``index_select``). The decoded file is in the order of the file list (train,
then test, each sorted by class); :func:`arranged` writes, once per order, a copy whose rows are
in the order a benchmark needs (grouped by experience, then class), named after that order. The
identity order needs no copy. Disk cost: the decoded file plus one copy per class order used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # part of the fingerprint: bump when the decoding changes
POOL_MIN = 1000  # decode this many images or more in a process pool
CHUNK = 64  # images per pool task
COPY_ROWS = 256  # rows per chunk when writing an arranged copy


@dataclass
class ImageList:
    """The images of a dataset: absolute paths, integer labels (0..K-1), whether each is a
    training image, and the class names (``classes[label]``)."""

    root: Path
    files: list[Path]
    labels: np.ndarray
    train: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.files)


def fingerprint(images: ImageList, size: int) -> str:
    """A hash of every file's path relative to the root, byte size and mtime, with its label and
    split, and the decoded size: any change to the source gives another cache file."""
    h = hashlib.sha256(f"v{FORMAT_VERSION} {size}\n".encode())
    for f, y, tr in zip(images.files, images.labels.tolist(), images.train.tolist(), strict=True):
        try:
            st = f.stat()
        except OSError as e:
            raise FileNotFoundError(f"{f}: {e.strerror or e}") from None
        rel = os.path.relpath(f, images.root)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{y}\0{int(tr)}\n".encode())
    return h.hexdigest()


def decode_image(path: Path, size: int) -> np.ndarray:
    """One image as (3, size, size) uint8 RGB: shorter side resized to ``size``, centre crop."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG only: decode at a reduced scale ≥ size
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def _decode_into(out: np.ndarray, start: int, paths: Sequence[Path], size: int) -> int:
    for k, p in enumerate(paths):
        try:
            out[start + k] = decode_image(p, size)
        except Exception as e:  # noqa: BLE001 - any unreadable image: name it
            raise ValueError(f"cannot decode image {p}: {' '.join(str(e).split())}") from None
    return len(paths)


def _decode_chunk(file: str, shape: tuple[int, ...], start: int, paths: list, size: int) -> int:
    """Pool worker: decode ``paths`` into rows ``start...`` of the raw file ``file``."""
    out = np.memmap(file, dtype=np.uint8, mode="r+", shape=shape)
    n = _decode_into(out, start, paths, size)
    out.flush()
    return n


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _write_atomic(final: Path, shape: tuple[int, ...], fill) -> None:
    """Create a raw uint8 file of ``shape`` under a temporary name, let ``fill(tmp_path, array)``
    write it, then rename it to ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=final.stem + ".", suffix=".tmp")
    os.close(fd)
    try:
        out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
        fill(tmp, out)
        out.flush()
        del out
        os.chmod(tmp, 0o644)  # a shared cache: temporary files are created private
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open(file: Path, shape: tuple[int, ...]) -> np.memmap:
    # Copy-on-write: torch.from_numpy accepts it without a read-only warning, and a write through
    # a tensor changes the process's pages, never the cache file.
    return np.memmap(file, dtype=np.uint8, mode="c", shape=shape)


def cache_folder(data_dir: Path, dataset: str, source: Path, size: int) -> Path:
    """Where the cache of ``source`` decoded at ``size`` lives (one folder per source)."""
    tag = hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]
    return data_dir / dataset / f"{tag}-{size}px"


def decoded(images: ImageList, size: int, folder: Path) -> tuple[np.memmap, str]:
    """The images as an (N, 3, size, size) uint8 memmap in the list's order, and their
    fingerprint. Decodes (and caches) only when no cache file of this fingerprint exists."""
    fp = fingerprint(images, size)
    shape = (len(images), 3, size, size)
    final = folder / f"images-{fp[:20]}.u8"
    if final.is_file() and final.stat().st_size == int(np.prod(shape)):
        log.info("images of %s: decoded cache %s", images.root, final)
        return _open(final, shape), fp
    for stale in folder.glob("*.u8"):  # another fingerprint: the source changed
        stale.unlink(missing_ok=True)
    log.info(
        "decoding %d images of %s at %d px into %s (once; later runs map the cache)",
        len(images),
        images.root,
        size,
        final,
    )
    _write_atomic(final, shape, lambda tmp, out: _decode_all(images.files, size, tmp, out))
    return _open(final, shape), fp


def _decode_all(files: list[Path], size: int, tmp: str, out: np.ndarray) -> None:
    n, t0 = len(files), time.monotonic()
    workers = min(_workers(), 16)
    if n < POOL_MIN or workers < 2:
        for start in range(0, n, CHUNK):
            _decode_into(out, start, files[start : start + CHUNK], size)
        return
    out.flush()
    done, next_report = 0, 0.1
    # spawn, not fork: forking a process whose torch holds threads can deadlock
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        jobs = [
            pool.submit(_decode_chunk, tmp, out.shape, s, files[s : s + CHUNK], size)
            for s in range(0, n, CHUNK)
        ]
        for job in as_completed(jobs):
            done += job.result()
            if done / n >= next_report or done == n:
                rate = done / max(time.monotonic() - t0, 1e-9)
                log.info("decoded %d/%d images (%.0f/s, %d processes)", done, n, rate, workers)
                next_report += 0.1


def arranged(source: np.memmap, order: np.ndarray, folder: Path, fp: str) -> np.memmap | np.ndarray:
    """The rows of ``source`` in the order ``order`` (a permutation of its row indices) as a
    memmap: ``source`` itself for the identity, else a cached copy named after the order."""
    order = np.asarray(order, dtype=np.int64)
    if np.array_equal(order, np.arange(len(source))):
        return source
    tag = hashlib.sha256(order.tobytes()).hexdigest()[:16]
    final = folder / f"arranged-{fp[:20]}-{tag}.u8"
    shape = tuple(source.shape)
    if final.is_file() and final.stat().st_size == int(np.prod(shape)):
        return _open(final, shape)
    log.info("writing the images in this benchmark's class order to %s (once)", final)

    def fill(_tmp: str, out: np.ndarray) -> None:
        for a in range(0, len(order), COPY_ROWS):
            out[a : a + COPY_ROWS] = source[order[a : a + COPY_ROWS]]

    _write_atomic(final, shape, fill)
    return _open(final, shape)
