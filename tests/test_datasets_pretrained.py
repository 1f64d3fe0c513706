"""The pre-trained track's dataset readers (ImageNet-R, ImageNet-A, CUB-200, OmniBenchmark,
VTAB) on small trees generated in the official and PILOT layouts, their memory-mapped cache,
and PILOT's class order."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clrun import benchmarks as bm
from clrun.benchmarks import pretrained
from clrun.datasets import images as im
from clrun.datasets.store import DatasetUnavailableError

SIZE = 12  # decoded image size: tiny, the tests stay fast


def save_image(path: Path, seed: int, ext: str = ".jpg") -> Path:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(8, 20)), int(rng.integers(8, 20)), 3)  # non-square, some upscaled
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path.with_suffix(ext))
    return path.with_suffix(ext)


def class_tree(root: Path, classes: list[str], per_class: int, seed: int = 0) -> None:
    for k, c in enumerate(classes):
        for j in range(per_class):
            save_image(root / c / f"img_{j}", seed * 100_000 + k * 100 + j, [".jpg", ".png"][j % 2])


def wnids(n: int) -> list[str]:
    return [f"n{1_000_000 + 7 * k:08d}" for k in range(n)]


def split_tree(root: Path, classes: list[str], n_train: int, n_test: int) -> None:
    """PILOT's layout: root/train/<class>/*, root/test/<class>/*."""
    class_tree(root / "train", classes, n_train, seed=1)
    class_tree(root / "test", classes, n_test, seed=2)


def pilot_order(n: int, seed: int = 1993) -> list[int]:
    np.random.seed(seed)  # what LAMDA-PILOT's DataManager does (shuffle: true)
    return np.random.permutation(n).tolist()


def all_experiences(b):
    return b.train_stream + b.validation_stream + b.test_stream


# ---------------------------------------------------------------- ImageNet-R / ImageNet-A


def test_imagenet_r_pilot_layout(tmp_path):
    split_tree(tmp_path / "data" / "imagenet-r", wnids(200), 2, 1)
    b = bm.imagenet_r(str(tmp_path / "data"), image_size=SIZE, data_dir=str(tmp_path / "cache"))
    assert b.n_classes == 200 and b.input_shape == (3, SIZE, SIZE)
    assert len(b.train_stream) == len(b.test_stream) == 10  # B0 Inc20
    assert sum(map(len, b.train_stream)) == 400 and sum(map(len, b.test_stream)) == 200
    order = pilot_order(200)
    assert b.info["class_order"] == order
    for i, (tr, te) in enumerate(zip(b.train_stream, b.test_stream, strict=True)):
        assert tr.classes == te.classes == sorted(order[20 * i : 20 * (i + 1)])
        assert tr.x.dtype == torch.uint8 and tuple(tr.x.shape[1:]) == (3, SIZE, SIZE)
    # a sample's pixels are its file, decoded; its label is its folder's rank among sorted wnids
    ex = b.test_stream[3]
    c = int(ex.y[0])
    f = next((tmp_path / "data" / "imagenet-r" / "test" / wnids(200)[c]).iterdir())
    assert torch.equal(ex.x[0], torch.from_numpy(im.decode_image(f, SIZE)))


def test_imagenet_r_official_tree_is_split_80_20_with_split_seed(tmp_path):
    class_tree(tmp_path / "imagenet-r", wnids(200), 4)
    (tmp_path / "imagenet-r" / "README.txt").write_text("not a class")
    kw = {"image_size": SIZE, "data_dir": str(tmp_path / "cache"), "augment": False}
    b = bm.imagenet_r(str(tmp_path / "imagenet-r"), **kw)
    assert (b.info["n_train"], b.info["n_test"]) == (640, 160)  # int(0.8 × 800)
    again = bm.imagenet_r(str(tmp_path / "imagenet-r"), **kw)
    other = bm.imagenet_r(str(tmp_path / "imagenet-r"), split_seed=1, **kw)
    y = [torch.cat([ex.y for ex in s.test_stream]) for s in (b, again, other)]
    assert torch.equal(y[0], y[1]) and not torch.equal(y[0], y[2])


def test_imagenet_r_split_lists_of_coda_prompt(tmp_path):
    root = tmp_path / "imagenet-r"
    names = wnids(200)
    class_tree(root, names, 2)
    lists = tmp_path / "splits"
    lists.mkdir()
    for part, j in (("train", 0), ("test", 1)):
        ext = [".jpg", ".png"][j]
        data = "".join(f"- data/imagenet-r/{c}/img_{j}{ext}\n" for c in names)
        targets = "".join(f"- {k}\n" for k in range(200))
        (lists / f"imagenet-r_{part}.yaml").write_text(f"data:\n{data}targets:\n{targets}")
    kw = {"image_size": SIZE, "data_dir": str(tmp_path / "cache")}
    b = bm.imagenet_r(str(root), split_lists=str(lists), **kw)
    assert (b.info["n_train"], b.info["n_test"]) == (200, 200)
    (root / names[5] / "img_1.png").unlink()
    with pytest.raises(DatasetUnavailableError, match="img_1.png.*listed, but missing") as e:
        bm.imagenet_r(str(root), split_lists=str(lists), **kw)
    assert "\n" not in e.value.line()


def test_imagenet_a_pilot_layout_domain_and_task_scenarios(tmp_path):
    split_tree(tmp_path / "imagenet-a", wnids(200), 1, 1)
    kw = {"image_size": SIZE, "data_dir": str(tmp_path / "cache")}
    b = bm.imagenet_a(str(tmp_path), **kw)
    assert len(b.train_stream) == 20 and b.train_stream[0].classes == sorted(pilot_order(200)[:10])
    task = bm.imagenet_a(str(tmp_path), scenario="task", **kw)
    assert [int(ex.t.unique()) for ex in task.test_stream] == list(range(20))
    domain = bm.imagenet_a(str(tmp_path), scenario="domain", **kw)
    assert domain.n_classes == 10 and all(
        ex.classes == list(range(10)) for ex in domain.test_stream
    )


# ---------------------------------------------------------------- CUB, OmniBenchmark, VTAB


def cub_official(root: Path, per_class: int = 3) -> None:
    """CUB_200_2011: images.txt, image_class_labels.txt, train_test_split.txt, images/."""
    rows, labels, split = [], [], []
    for c in range(1, 201):
        folder = f"{c:03d}.Bird_{c}"
        for j in range(per_class):
            n = len(rows) + 1
            save_image(root / "images" / folder / f"Bird_{c}_{j}", n)
            rows.append(f"{n} {folder}/Bird_{c}_{j}.jpg")
            labels.append(f"{n} {c}")
            split.append(f"{n} {int(j > 0)}")  # image 0 of each class tests
    for name, lines in (
        ("images.txt", rows),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
    ):
        (root / name).write_text("\n".join(lines) + "\n")


def test_cub200_official_layout(tmp_path):
    cub_official(tmp_path / "CUB_200_2011")
    b = bm.cub200(str(tmp_path), image_size=SIZE, data_dir=str(tmp_path / "cache"))
    assert (b.info["n_train"], b.info["n_test"]) == (400, 200)
    assert b.info["classes"][:2] == ["001.Bird_1", "002.Bird_2"]
    assert len(b.train_stream) == 20 and b.info["class_order"] == pilot_order(200)
    ex = b.test_stream[0]
    c = int(ex.y[0])  # class c is id c + 1: its test image is Bird_{c+1}_0
    f = tmp_path / "CUB_200_2011" / "images" / f"{c + 1:03d}.Bird_{c + 1}" / f"Bird_{c + 1}_0.jpg"
    assert torch.equal(ex.x[0], torch.from_numpy(im.decode_image(f, SIZE)))


def test_cub200_pilot_layout(tmp_path):
    split_tree(tmp_path / "cub", [f"{c:03d}.Bird_{c}" for c in range(1, 201)], 2, 1)
    b = bm.cub200(str(tmp_path), image_size=SIZE, data_dir=str(tmp_path / "cache"))
    assert (b.info["n_train"], b.info["n_test"], b.n_classes) == (400, 200, 200)


def test_omnibenchmark_pilot_layout(tmp_path):
    split_tree(tmp_path / "omnibenchmark", [f"concept_{k:03d}" for k in range(300)], 1, 1)
    b = bm.omnibenchmark(str(tmp_path), image_size=SIZE, data_dir=str(tmp_path / "cache"))
    assert b.n_classes == 300 and len(b.train_stream) == 10  # B0 Inc30
    assert b.train_stream[0].classes == sorted(pilot_order(300)[:30])


def test_vtab_keeps_the_folder_order(tmp_path):
    names = [
        f"{d}_{k}"
        for d in ("a_resisc", "b_dtd", "c_pets", "d_eurosat", "e_flowers")
        for k in range(10)
    ]
    split_tree(tmp_path / "vtab-cil" / "vtab", names, 2, 1)
    b = bm.vtab(str(tmp_path), image_size=SIZE, data_dir=str(tmp_path / "cache"))
    assert b.n_classes == 50 and len(b.train_stream) == 5
    assert [ex.classes for ex in b.test_stream] == [
        list(range(10 * i, 10 * i + 10)) for i in range(5)
    ]
    assert b.info["classes"][:10] == names[:10]


# ---------------------------------------------------------------- cache and memory


def vtab_tree(tmp_path: Path) -> Path:
    split_tree(tmp_path / "vtab", [f"class_{k:02d}" for k in range(50)], 2, 1)
    return tmp_path / "vtab"


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    root = vtab_tree(tmp_path)
    kw = {"image_size": SIZE, "data_dir": str(tmp_path / "cache"), "class_order": "pilot"}
    first = bm.vtab(str(root), **kw)
    calls = []
    decode = im.decode_image

    def refuse(path, size):
        calls.append(path)
        raise AssertionError("decoded again")

    monkeypatch.setattr(im, "decode_image", refuse)
    second = bm.vtab(str(root), **kw)  # no decode: the cache and the arranged copy are reused
    for a, b in zip(all_experiences(first), all_experiences(second), strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    changed = root / "train" / "class_07" / "img_1.png"
    save_image(changed, 999, ".png")
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ValueError, match="cannot decode image .*decoded again"):
        bm.vtab(str(root), **kw)

    def counting(path, size):
        calls.append(path)
        return decode(path, size)

    calls.clear()
    monkeypatch.setattr(im, "decode_image", counting)
    third = bm.vtab(str(root), **kw)
    assert len(calls) == 150  # rebuilt: every image decoded once
    ex = next(ex for ex in third.train_stream if 7 in ex.classes)
    row = int(torch.nonzero(ex.y == 7)[1])  # the class's second training image: img_1.png
    assert torch.equal(ex.x[row], torch.from_numpy(decode(changed, SIZE)))
    folder = next((tmp_path / "cache" / "vtab").iterdir())
    assert len(list(folder.glob("images-*.u8"))) == 1  # the stale cache was removed


def test_experiences_are_views_of_one_memory_map(tmp_path):
    """No image is copied at build time: every experience, validation ones included, is a slice
    of the one mapped file, in the order of the experiences."""
    root = vtab_tree(tmp_path)
    kw = {"image_size": SIZE, "data_dir": str(tmp_path / "cache"), "class_order": "pilot"}
    b = bm.vtab(str(root), validation=0.5, **kw)
    exps = all_experiences(b)
    storages = {ex.x.untyped_storage().data_ptr() for ex in exps}
    assert len(storages) == 1
    assert sum(map(len, exps)) * 3 * SIZE * SIZE == exps[0].x.untyped_storage().nbytes()
    assert sum(map(len, b.validation_stream)) == 50 and sum(map(len, b.train_stream)) == 50
    for tr, va in zip(b.train_stream, b.validation_stream, strict=True):
        assert tr.classes == va.classes
    b.to("cpu")
    assert {ex.x.untyped_storage().data_ptr() for ex in all_experiences(b)} == storages


def test_decoding_in_a_process_pool_gives_the_same_cache(tmp_path, monkeypatch):
    root = vtab_tree(tmp_path)
    inline = bm.vtab(str(root), image_size=SIZE, data_dir=str(tmp_path / "a"))
    monkeypatch.setattr(im, "POOL_MIN", 1)
    monkeypatch.setattr(im, "_workers", lambda: 2)
    pooled = bm.vtab(str(root), image_size=SIZE, data_dir=str(tmp_path / "b"))
    for a, b in zip(all_experiences(inline), all_experiences(pooled), strict=True):
        assert torch.equal(a.x, b.x)


@pytest.mark.slow
def test_building_a_200_mb_benchmark_reads_no_image_into_memory(tmp_path):
    split_tree(tmp_path / "vtab", [f"class_{k:02d}" for k in range(50)], 16, 4)  # 1000 images
    kw = {"image_size": 256, "data_dir": str(tmp_path / "cache"), "class_order": "pilot"}
    bm.vtab(str(tmp_path), **kw)  # decodes (≈ 200 MB), writes the arranged copy

    def rss() -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) * 1024

    before = rss()
    b = bm.vtab(str(tmp_path), **kw)
    assert rss() - before < 50e6
    assert sum(map(len, all_experiences(b))) * 3 * 256 * 256 > 190e6


# ---------------------------------------------------------------- errors and class orders


@pytest.mark.parametrize(
    "make, path, message",
    [
        (None, None, "needs benchmark.path"),
        (None, "nowhere", "is not a folder"),
        ("archive", "imagenet-r.tar", "is an archive, extract it"),
        ("few", "imagenet-r", "has 3 class folders, not the 200"),
    ],
)
def test_a_missing_or_wrong_path_is_one_line_saying_what_to_put_where(
    tmp_path, make, path, message
):
    if make == "archive":
        (tmp_path / path).write_bytes(b"")
    elif make == "few":
        class_tree(tmp_path / path, wnids(3), 1)
    with pytest.raises(DatasetUnavailableError, match=message) as e:
        bm.imagenet_r(None if path is None else str(tmp_path / path), data_dir=str(tmp_path))
    line = e.value.line()
    assert "\n" not in line and "imagenet-r.tar" in line and "benchmark.path=" in line


def test_every_reader_says_what_to_put_where(tmp_path):
    for fn, what in (
        (bm.imagenet_a, "imagenet-a"),
        (bm.cub200, "CUB_200_2011"),
        (bm.omnibenchmark, "omnibenchmark/"),
        (bm.vtab, "vtab-cil/vtab"),
    ):
        with pytest.raises(DatasetUnavailableError, match="no train/ and test/|200|not a folder"):
            fn(str(tmp_path / "missing"))
        with pytest.raises(DatasetUnavailableError) as e:
            fn(str(tmp_path))
        assert what in e.value.line() and "\n" not in e.value.line()


def test_pilot_class_order_is_pilots_seeded_permutation(monkeypatch):
    assert bm.NAMED_CLASS_ORDERS["pilot"](100, 1993) == pilot_order(100)
    assert bm.NAMED_CLASS_ORDERS["sorted"](5, 1993) == [0, 1, 2, 3, 4]
    # Split CIFAR-100's default (null order, seed 1993) is PILOT's order too
    rng = np.random.default_rng(0)
    fake = {
        "x_train": torch.from_numpy(rng.integers(0, 256, (200, 3, 4, 4), dtype=np.uint8)),
        "y_train": torch.arange(200) % 100,
        "x_test": torch.from_numpy(rng.integers(0, 256, (100, 3, 4, 4), dtype=np.uint8)),
        "y_test": torch.arange(100),
    }
    monkeypatch.setattr("clrun.datasets.load_dataset", lambda *a, **k: fake)
    b = bm.split_cifar100()
    assert b.info["class_order"] == pilot_order(100)
    assert b.train_stream[0].classes == sorted(pilot_order(100)[:10])
    assert pretrained.N_CLASSES == {
        "imagenet_r": 200,
        "imagenet_a": 200,
        "cub200": 200,
        "omnibenchmark": 300,
        "vtab": 50,
    }
