"""The datasets of the pre-trained-backbone track (ImageNet-R, ImageNet-A, CUB-200,
OmniBenchmark, VTAB), read from the folder a user gives (``benchmark.path``), split by class.

None of them can be downloaded by clrun. Each function reads the layout of the official release
or the pre-split folders that LAMDA-PILOT's README links to (``<name>/train/<class>/*`` and
``<name>/test/<class>/*``, read by PILOT's ``utils/data.py`` with ``ImageFolder``: classes are
the sorted folder names), checks the class count PILOT's ``utils/data.py`` gives (its
``class_order`` lengths: 200, 200, 200, 300, 50), and says in one line what to put where when the
folder is missing or wrong. Images are decoded once into a memory-mapped uint8 cache
(:mod:`clrun.datasets.images`); every experience is a contiguous slice of it, so building a
benchmark reads no image into memory, and batches gather their rows. ``Benchmark.to(cuda)``
copies the data to the GPU; on the CPU it stays mapped. ``online=true`` copies the training
images into memory (the online stream reorders them).

Class orders: a null ``class_order`` is PILOT's (``pilot``: ``numpy.random.seed(seed)``,
``permutation``; seed 1993 in every PILOT and APER config), except VTAB, whose APER config
keeps the folder order (``shuffle: false``, so that each experience is one domain).
Increments (``n_experiences``) default to the configs of PILOT (``exps/*_inr.json``: ImageNet-R
B0 Inc20) and APER (``zhoudw-zdw/RevisitingCIL`` ``exps/simplecil/*.json``: ImageNet-A and CUB
B0 Inc10, OmniBenchmark B0 Inc30, VTAB B0 Inc10; APER's ImageNet-R is B0 Inc5).

Unsplit official trees (``imagenet-r/<wnid>/*.jpg``, ``imagenet-a/<wnid>/*.jpg``) are split 80/20
as CODA-Prompt's list and the ContinualDatasets ``random_split`` do: a random ``int(0.8 N)`` of
all images (not per class) train, the rest test, drawn with ``numpy.random.RandomState(
split_seed)``. That is not the same draw as theirs; ImageNet-R can use CODA-Prompt's exact lists
(``split_lists``: its ``dataloaders/splits/imagenet-r_{train,test}.yaml``, 24,000 / 6,000
images, counted from those files). Split sizes of PILOT's pre-split folders are not verified here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clrun.benchmarks.core import (
    Benchmark,
    Experience,
    _check_class_order,
    _check_scenario,
    _experience_sizes,
    _finish,
    _stratified_split,
)
from clrun.checks import int_at_least, number_in, require
from clrun.datasets.images import ImageList, arranged, cache_folder, decoded
from clrun.datasets.store import DatasetUnavailableError

log = logging.getLogger(__name__)

# Normalisation of ImageNet-trained backbones; a model that reports its own replaces it.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Classes per dataset: the length of each class_order in LAMDA-PILOT's utils/data.py.
N_CLASSES = {"imagenet_r": 200, "imagenet_a": 200, "cub200": 200, "omnibenchmark": 300, "vtab": 50}
# torchvision's ImageFolder extensions (PILOT reads its folders with ImageFolder).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TRAIN_FRACTION = 0.8  # unsplit official trees: the share of all images that trains

HOW_TO = {
    "imagenet_r": "extract the official imagenet-r.tar (people.eecs.berkeley.edu/~hendrycks/"
    "imagenet-r.tar) and set benchmark.path=<folder>/imagenet-r (200 <wnid> folders), or "
    "PILOT's pre-split imagenet-r/ with train/ and test/",
    "imagenet_a": "extract the official imagenet-a.tar and set benchmark.path=<folder>/imagenet-a "
    "(200 <wnid> folders), or PILOT's pre-split imagenet-a/ with train/ and test/",
    "cub200": "extract the official CUB_200_2011.tgz and set benchmark.path=<folder>/CUB_200_2011 "
    "(images.txt, image_class_labels.txt, train_test_split.txt, images/), or PILOT's "
    "pre-split cub/ with train/ and test/",
    "omnibenchmark": "set benchmark.path to PILOT's omnibenchmark/ (train/ and test/, 300 "
    "class folders each; linked from LAMDA-PILOT's README)",
    "vtab": "set benchmark.path to PILOT's vtab/ (vtab-cil/vtab: train/ and test/, 50 class "
    "folders each; linked from LAMDA-PILOT's README)",
}


def _unavailable(dataset: str, problem: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(problem.replace(";", ","), HOW_TO[dataset])


def _image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted), as ``ImageFolder`` finds them."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        out += [
            Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return out


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _check_count(dataset: str, where: Path, classes: list[str]) -> None:
    if len(classes) != N_CLASSES[dataset]:
        raise _unavailable(
            dataset,
            f"{where} has {len(classes)} class folders, not the {N_CLASSES[dataset]} of {dataset}",
        )


def _listing(
    root: Path, files: list[Path], labels: list[int], train: list[bool], classes
) -> ImageList:
    """The list in cache order: training images, then test images, each sorted by label (stable:
    each class keeps its files' order)."""
    y, tr = np.asarray(labels, dtype=np.int64), np.asarray(train, dtype=bool)
    idx = np.lexsort((np.arange(len(y)), y, ~tr))
    return ImageList(root, [files[i] for i in idx], y[idx], tr[idx], list(classes))


def _read_split_folders(dataset: str, root: Path) -> ImageList:
    """PILOT's layout: ``root/train/<class>/*`` and ``root/test/<class>/*``."""
    classes = _class_folders(root / "train")
    _check_count(dataset, root / "train", classes)
    if _class_folders(root / "test") != classes:
        raise _unavailable(
            dataset, f"{root / 'test'} has other class folders than {root / 'train'}"
        )
    files, labels, train = [], [], []
    for part in ("train", "test"):
        for k, c in enumerate(classes):
            found = _image_files(root / part / c)
            files += found
            labels += [k] * len(found)
            train += [part == "train"] * len(found)
    return _listing(root, files, labels, train, classes)


def _read_class_tree(dataset: str, root: Path, split_seed: int) -> ImageList:
    """An unsplit official tree ``root/<class>/*``: a seeded random 80/20 of all images."""
    classes = _class_folders(root)
    _check_count(dataset, root, classes)
    files, labels = [], []
    for k, c in enumerate(classes):
        found = _image_files(root / c)
        files += found
        labels += [k] * len(found)
    require("benchmark.split_seed", split_seed, int_at_least(0))
    perm = np.random.RandomState(split_seed).permutation(len(files))
    train = np.zeros(len(files), dtype=bool)
    train[perm[: int(TRAIN_FRACTION * len(files))]] = True
    return _listing(root, files, labels, train.tolist(), classes)


def _read_split_lists(dataset: str, root: Path, lists: Path) -> ImageList:
    """CODA-Prompt's split files: ``data:`` lists of ``data/imagenet-r/<wnid>/<file>``."""
    classes = _class_folders(root)
    _check_count(dataset, root, classes)
    index = {c: k for k, c in enumerate(classes)}
    files, labels, train = [], [], []
    for part in ("train", "test"):
        f = lists / f"imagenet-r_{part}.yaml"
        if not f.is_file():
            raise _unavailable(
                dataset,
                f"benchmark.split_lists={str(lists)!r} has no imagenet-r_{part}.yaml (CODA-Prompt's "
                "dataloaders/splits/)",
            )
        for line in f.read_text().splitlines():
            if line.startswith("targets"):
                break
            if line.startswith("- "):
                wnid, name = line[2:].strip().split("/")[-2:]
                files.append(root / wnid / name)
                labels.append(index[wnid])
                train.append(part == "train")
    return _listing(root, files, labels, train, classes)


def _read_cub_official(root: Path) -> ImageList:
    """``CUB_200_2011``: images.txt (id path), image_class_labels.txt (id class 1..200),
    train_test_split.txt (id is_training), images/. Class k is the folder of class k + 1."""

    def table(name: str) -> dict[str, str]:
        rows = (line.split(maxsplit=1) for line in (root / name).read_text().splitlines())
        return {r[0]: r[1].strip() for r in rows if len(r) == 2}

    paths = table("images.txt")
    label_of, is_train = table("image_class_labels.txt"), table("train_test_split.txt")
    if missing := [i for i in paths if i not in label_of or i not in is_train][:3]:
        raise _unavailable("cub200", f"{root}: images {missing} have no label or split")
    ids = list(paths)
    labels = [int(label_of[i]) - 1 for i in ids]
    folder_of = {}
    for i, y in zip(ids, labels, strict=True):
        folder_of.setdefault(y, paths[i].split("/")[0])
    classes = [folder_of[k] for k in sorted(folder_of)]
    _check_count("cub200", root / "images", classes)
    files = [root / "images" / paths[i] for i in ids]
    return _listing(root, files, labels, [is_train[i] == "1" for i in ids], classes)


def _resolve(dataset: str, path: str | None, names: Sequence[str]) -> Path:
    """``path`` itself, or the first of its sub-folders ``names`` that exists."""
    if path is None:
        raise _unavailable(dataset, f"benchmark={dataset} needs benchmark.path")
    root = Path(path).expanduser()
    if root.is_file() and root.name.endswith((".tar", ".tgz", ".tar.gz", ".zip")):
        raise _unavailable(dataset, f"benchmark.path={str(root)!r} is an archive, extract it")
    if not root.is_dir():
        raise _unavailable(dataset, f"benchmark.path={str(root)!r} is not a folder")
    for name in names:
        if (root / name).is_dir():
            return root / name
    return root


def _is_split(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _read(dataset: str, path: str | None, names: Sequence[str], split_seed: int = 0) -> ImageList:
    root = _resolve(dataset, path, names)
    if _is_split(root):
        return _read_split_folders(dataset, root)
    if dataset in ("imagenet_r", "imagenet_a"):
        return _read_class_tree(dataset, root, split_seed)
    raise _unavailable(dataset, f"benchmark.path={str(root)!r} has no train/ and test/ folders")


def _build(
    name: str,
    images: ImageList,
    *,
    image_size: int,
    data_dir: str | None,
    scenario: str,
    n_experiences: int,
    first_experience_classes: int | None,
    class_order: Sequence[int] | str | None,
    seed: int,
    augment: bool,
    online: bool,
    online_batch_size: int,
    validation: float,
    **_: object,
) -> Benchmark:
    """Split ``images`` by class into experiences that are contiguous slices of one memmap: the
    rows are arranged as train experience 0 (kept, then held out for validation), 1, ..., then
    test experience 0, 1, ...; inside an experience, the cache's order (by class, then file)."""
    from clrun.datasets import resolve_data_dir

    _check_scenario(scenario)
    require("benchmark.image_size", image_size, int_at_least(8))
    require("benchmark.validation", validation, number_in(0, 1, open_hi=True))
    k = len(images.classes)
    sizes = _experience_sizes(name, k, n_experiences, first_experience_classes)
    if scenario == "domain" and len(set(sizes)) > 1:
        raise ValueError(
            "benchmark.scenario=domain needs experiences of equal size; drop "
            "benchmark.first_experience_classes or use scenario class or task"
        )
    order = _check_class_order("pilot" if class_order is None else class_order, k, seed)
    exp_of_class, pos_in_exp = np.empty(k, dtype=np.int64), np.empty(k, dtype=np.int64)
    starts = np.cumsum([0, *sizes])
    for i in range(n_experiences):
        for p, c in enumerate(order[starts[i] : starts[i + 1]]):
            exp_of_class[c], pos_in_exp[c] = i, p

    folder = cache_folder(resolve_data_dir(data_dir), name, images.root, image_size)
    try:
        source, fp = decoded(images, image_size, folder)
    except FileNotFoundError as e:  # a file that a split list or images.txt names
        raise _unavailable(name, f"{e} (listed, but missing)") from None

    # Rows of each part, in cache order; the validation split is core's (same generator).
    g = torch.Generator().manual_seed(seed + 7919)
    exp = exp_of_class[images.labels]
    y_all = torch.from_numpy(pos_in_exp[images.labels] if scenario == "domain" else images.labels)
    parts: list[tuple[str, int, np.ndarray]] = []
    for i in range(n_experiences):
        rows = np.flatnonzero(images.train & (exp == i))
        if validation > 0:
            keep, held = _stratified_split(y_all[rows], validation, g)
            parts += [("train", i, rows[keep.numpy()]), ("validation", i, rows[held.numpy()])]
        else:
            parts.append(("train", i, rows))
    parts += [("test", i, np.flatnonzero(~images.train & (exp == i))) for i in range(n_experiences)]
    x = torch.from_numpy(arranged(source, np.concatenate([p[2] for p in parts]), folder, fp))

    streams: dict[str, list[Experience]] = {"train": [], "validation": [], "test": []}
    start = 0
    for stream, i, rows in parts:
        y = y_all[rows]
        t = torch.full_like(y, i if scenario == "task" else 0)
        xi = x[start : start + len(rows)]  # a view: no copy
        streams[stream].append(Experience(i, xi, y, t, torch.full_like(y, i)))
        start += len(rows)

    b = Benchmark(
        name=name,
        scenario=scenario,
        train_stream=streams["train"],
        test_stream=streams["test"],
        n_classes=sizes[0] if scenario == "domain" else k,
        input_shape=(3, image_size, image_size),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        info={
            "class_order": order,
            "classes_per_experience": sizes[0] if len(set(sizes)) == 1 else sizes,
            "path": str(images.root),
            "classes": images.classes,
            "image_size": image_size,
            "n_train": int(images.train.sum()),
            "n_test": int((~images.train).sum()),
        },
        seed=seed,
        validation_stream=streams["validation"],
    )
    if validation > 0:
        b.info["validation"] = validation
    if online:
        log.warning("%s: online=true copies the training images into memory", name)
    return _finish(
        b, augment=augment, online=online, online_batch_size=online_batch_size, validation=0.0
    )


def imagenet_r(
    path: str | None = None,
    split_lists: str | None = None,
    split_seed: int = 0,
    image_size: int = 224,
    scenario: str = "class",
    n_experiences: int = 10,
    first_experience_classes: int | None = None,
    class_order: Sequence[int] | str | None = None,
    seed: int = 1993,
    data_dir: str | None = None,
    augment: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
    validation: float = 0.0,
) -> Benchmark:
    """ImageNet-R (Hendrycks et al. 2021): 200 ImageNet classes as renditions (art, cartoons,
    sketches, ...), 30,000 images. ``path``: PILOT's ``imagenet-r/`` (train/, test/) or the
    official ``imagenet-r/<wnid>/`` tree, split 80/20 with ``split_seed`` or by CODA-Prompt's
    lists in the folder ``split_lists``. Default: PILOT's B0 Inc20 (10 × 20), order seed 1993."""
    options = dict(locals())
    if split_lists is not None:
        root = _resolve("imagenet_r", path, ["imagenet-r"])
        images = _read_split_lists("imagenet_r", root, Path(split_lists).expanduser())
    else:
        images = _read("imagenet_r", path, ["imagenet-r"], split_seed)
    return _build("imagenet_r", images, **options)


def imagenet_a(
    path: str | None = None,
    split_seed: int = 0,
    image_size: int = 224,
    scenario: str = "class",
    n_experiences: int = 20,
    first_experience_classes: int | None = None,
    class_order: Sequence[int] | str | None = None,
    seed: int = 1993,
    data_dir: str | None = None,
    augment: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
    validation: float = 0.0,
) -> Benchmark:
    """ImageNet-A (Hendrycks et al. 2021): natural adversarial examples of 200 ImageNet classes.
    ``path``: PILOT's ``imagenet-a/`` (train/, test/) or the official ``imagenet-a/<wnid>/``
    tree, split 80/20 with ``split_seed``. Default: APER's B0 Inc10 (20 × 10), seed 1993."""
    options = dict(locals())
    images = _read("imagenet_a", path, ["imagenet-a"], split_seed)
    return _build("imagenet_a", images, **options)


def cub200(
    path: str | None = None,
    image_size: int = 224,
    scenario: str = "class",
    n_experiences: int = 20,
    first_experience_classes: int | None = None,
    class_order: Sequence[int] | str | None = None,
    seed: int = 1993,
    data_dir: str | None = None,
    augment: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
    validation: float = 0.0,
) -> Benchmark:
    """CUB-200-2011 (Wah et al. 2011): 200 bird species. ``path``: the official
    ``CUB_200_2011/`` (its train_test_split.txt decides the split) or PILOT's ``cub/`` (train/,
    test/). Default: APER's B0 Inc10 (20 × 10), order seed 1993."""
    options = dict(locals())
    root = _resolve("cub200", path, ["CUB_200_2011", "cub"])
    if (root / "images.txt").is_file():
        images = _read_cub_official(root)
    else:
        images = _read("cub200", str(root), [])
    return _build("cub200", images, **options)


def omnibenchmark(
    path: str | None = None,
    image_size: int = 224,
    scenario: str = "class",
    n_experiences: int = 10,
    first_experience_classes: int | None = None,
    class_order: Sequence[int] | str | None = None,
    seed: int = 1993,
    data_dir: str | None = None,
    augment: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
    validation: float = 0.0,
) -> Benchmark:
    """OmniBenchmark as APER samples it (300 classes; Zhang et al. 2022 for the full release).
    ``path``: PILOT's ``omnibenchmark/`` (train/, test/). Default: APER's B0 Inc30 (10 × 30)."""
    options = dict(locals())
    images = _read("omnibenchmark", path, ["omnibenchmark"])
    return _build("omnibenchmark", images, **options)


def vtab(
    path: str | None = None,
    image_size: int = 224,
    scenario: str = "class",
    n_experiences: int = 5,
    first_experience_classes: int | None = None,
    class_order: Sequence[int] | str | None = "sorted",
    seed: int = 1993,
    data_dir: str | None = None,
    augment: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
    validation: float = 0.0,
) -> Benchmark:
    """VTAB's class-incremental version of APER: 50 classes from 5 VTAB datasets. ``path``:
    PILOT's ``vtab-cil/vtab/`` (train/, test/). Default: APER's B0 Inc10 in the folder order
    (``sorted``, APER's ``shuffle: false``): 5 × 10. That each experience is then one source
    dataset (10 classes from each of 5) is the papers' description, unverified here."""
    options = dict(locals())
    images = _read("vtab", path, ["vtab-cil/vtab", "vtab"])
    return _build("vtab", images, **options)
