"""Your own data as a benchmark: arrays in ``.npz`` / ``.pt`` files (``benchmark=from_files``)
and class-per-folder image trees (``benchmark=image_folder``).

Both are held in memory as tensors like every other benchmark and split by class, or, for
arrays, by a column that names each sample's experience (:func:`split_by_column`).
Normalisation defaults to the statistics of the training inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from clrun.benchmarks.core import (
    Benchmark,
    Experience,
    _as_images,
    _check_scenario,
    _finish,
    _tuple_or_float,
    experience_of,
    split_by_class,
)
from clrun.checks import number_in, one_of, require

FILE_KEYS = ("x", "y", "t", "exp")


def read_arrays(path: str | Path, what: str = "benchmark.path") -> dict[str, Tensor]:
    """``x``, ``y`` and the optional ``t`` and ``exp`` of a ``.npz`` (numpy, no pickles) or
    ``.pt`` file (a dict of tensors, loaded with ``weights_only=True``), as CPU tensors."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{what}={str(path)!r}: no such file")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            raw = {k: f[k] for k in f.files}
    elif path.suffix in (".pt", ".pth"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - an unreadable or unsafe file
            first = " ".join(str(e).split())[:200]
            raise ValueError(
                f"{what}={str(path)!r} cannot be read with torch.load(weights_only=True) "
                f"({first}); save a dict of tensors with torch.save"
            ) from None
        if not isinstance(raw, dict):
            raise ValueError(f"{what}={str(path)!r} holds a {type(raw).__name__}, not a dict")
    else:
        raise ValueError(f"{what}={str(path)!r}: expected a .npz or .pt file")
    if missing := [k for k in ("x", "y") if k not in raw]:
        raise ValueError(
            f"{what}={str(path)!r} has no {' or '.join(map(repr, missing))}; it holds "
            f"{sorted(raw)}, and needs x (inputs), y (integer labels), optionally t (task "
            "labels) and exp (experience of each sample)"
        )
    out = {}
    for k in FILE_KEYS:
        if k in raw:
            v = raw[k]
            out[k] = v.cpu() if isinstance(v, Tensor) else torch.from_numpy(np.asarray(v))
    n = len(out["x"])
    for k, v in out.items():
        if v.dim() == 0 or len(v) != n:
            raise ValueError(f"{what}: {k} has shape {tuple(v.shape)}, not {n} rows like x")
        if k != "x" and (v.dim() != 1 or v.is_floating_point() or v.dtype == torch.bool):
            raise ValueError(
                f"{what}: {k} must be a 1-D integer array, not {v.dtype} {tuple(v.shape)}"
            )
    x = out["x"]
    if x.dim() not in (2, 3, 4):
        raise ValueError(
            f"{what}: x has shape {tuple(x.shape)}; expected (N, C, H, W) or (N, H, W) images "
            "or (N, D) vectors"
        )
    if x.dim() == 4 and x.shape[1] > 4 and x.shape[3] <= 4:
        raise ValueError(
            f"{what}: x has shape {tuple(x.shape)}, which looks channels-last; store images "
            "as (N, C, H, W) (numpy: x.transpose(0, 3, 1, 2))"
        )
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"{what}: x is {x.dtype}; store images as uint8 (0..255) or floats")
    if x.is_floating_point():
        out["x"] = x.float()
    return out


def _holdout(
    data: dict[str, Tensor], fraction: float, seed: int
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    require("benchmark.test_fraction", fraction, number_in(0, 1, open_lo=True, open_hi=True))
    n = len(data["y"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * fraction))
    return (
        {k: v[perm[n_test:]] for k, v in data.items()},
        {k: v[perm[:n_test]] for k, v in data.items()},
    )


def _relabel(train: Tensor, test: Tensor, what: str) -> tuple[Tensor, Tensor, list[int]]:
    """Map the values of ``train`` to 0..K-1 (sorted); ``test`` may only use values in it."""
    train, test = train.contiguous(), test.contiguous()
    values = torch.unique(train)
    unseen = sorted(set(torch.unique(test).tolist()) - set(values.tolist()))
    if unseen:
        raise ValueError(f"the test file has {what} {unseen[:10]} that the training file has not")
    return (
        torch.searchsorted(values, train),
        torch.searchsorted(values, test),
        values.tolist(),
    )


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (images) or per-feature (vectors) mean and std of x, in chunks."""
    dims = [0] + list(range(2, x.dim()))
    total = sq = None
    count = 0
    for chunk in x.split(4096):
        c = chunk.double()
        s, s2 = c.sum(dims), (c * c).sum(dims)
        total = s if total is None else total + s
        sq = s2 if sq is None else sq + s2
        count += c.numel() // c.shape[1]
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


def from_files(
    path: str | None = None,
    test_path: str | None = None,
    test_fraction: float = 0.2,
    split_by: str = "class",
    scenario: str = "class",
    n_experiences: int = 5,
    first_experience_classes: int | None = None,
    class_order: Sequence[int] | str | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    seed: int = 0,
    augment: bool = False,
    online: bool = False,
    online_batch_size: int = 10,
    validation: float = 0.0,
) -> Benchmark:
    """Your own arrays as a benchmark: ``path`` (and ``test_path``, or a seeded ``test_fraction``
    of ``path`` held out) are ``.npz`` / ``.pt`` files with ``x`` (uint8 0..255 or float inputs:
    images (N, C, H, W) or (N, H, W), or vectors (N, D)), ``y`` (integer labels, any values:
    they are mapped to 0..K-1 in sorted order), optionally ``t`` (task labels, used in the
    ``task`` scenario instead of the experience index) and ``exp`` (the experience of each
    sample). ``split_by=class`` splits by class like the Split benchmarks; ``split_by=column``
    uses ``exp`` (its sorted values are the experience order). ``mean``/``std`` default to the
    per-channel (per-feature) statistics of the training inputs."""
    if path is None:
        raise ValueError(
            "benchmark=from_files needs benchmark.path=<file.npz or file.pt> holding x and y "
            "(see conf/benchmark/from_files.yaml)"
        )
    require("benchmark.split_by", split_by, one_of(("class", "column")))
    _check_scenario(scenario)
    train = read_arrays(path, "benchmark.path")
    if test_path is not None:
        test = read_arrays(test_path, "benchmark.test_path")
    else:
        train, test = _holdout(train, test_fraction, seed)
    if train["x"].shape[1:] != test["x"].shape[1:] or train["x"].dtype != test["x"].dtype:
        raise ValueError(
            f"benchmark.test_path: x is {test['x'].dtype} {tuple(test['x'].shape[1:])} per "
            f"sample, the training x {train['x'].dtype} {tuple(train['x'].shape[1:])}"
        )
    y_tr, y_te, label_values = _relabel(train["y"].long(), test["y"].long(), "labels")
    data = {"x_train": train["x"], "y_train": y_tr, "x_test": test["x"], "y_test": y_te}
    if "t" in train and scenario == "task":
        if "t" not in test:
            raise ValueError("benchmark.test_path has no t (task labels) but the training file has")
        data["t_train"], data["t_test"] = train["t"].long(), test["t"].long()
    pixel_scale = 255.0 if train["x"].dtype == torch.uint8 else 1.0
    if mean is None or std is None:  # statistics of the training inputs, on the [0, 1] scale
        m, s = _channel_stats(_as_images(train["x"]))
        mean = tuple(v / pixel_scale for v in m) if mean is None else mean
        std = tuple(v / pixel_scale for v in s) if std is None else std
    if split_by == "class":
        b = split_by_class(
            "from_files",
            data,
            scenario=scenario,
            n_experiences=n_experiences,
            class_order=class_order,
            seed=seed,
            mean=mean,
            std=std,
            first_experience_classes=first_experience_classes,
            n_classes=len(label_values),
            pixel_scale=pixel_scale,
        )
    else:
        if "exp" not in train or "exp" not in test:
            raise ValueError(
                "benchmark.split_by=column needs exp (the experience of each sample) in the "
                "training and in the test file"
            )
        e_tr, e_te, exp_values = _relabel(train["exp"].long(), test["exp"].long(), "exp values")
        if len(exp_values) != n_experiences:
            raise ValueError(
                f"benchmark.n_experiences={n_experiences}, but the exp column has "
                f"{len(exp_values)} experiences: set benchmark.n_experiences={len(exp_values)}"
            )
        b = split_by_column(
            "from_files",
            {**data, "e_train": e_tr, "e_test": e_te},
            scenario=scenario,
            n_classes=len(label_values),
            mean=mean,
            std=std,
            seed=seed,
            pixel_scale=pixel_scale,
        )
        b.info["exp_values"] = exp_values
    if empty := [ex.index for ex in b.test_stream if len(ex) == 0]:
        raise ValueError(
            f"benchmark=from_files: test experiences {empty} have no samples; every experience "
            "needs test samples (check the test file's classes or exp column)"
        )
    b.info.update(path=str(path), label_values=label_values, split_by=split_by)
    return _finish(
        b,
        augment=augment,
        online=online,
        online_batch_size=online_batch_size,
        validation=validation,
    )


def split_by_column(
    name: str,
    data: dict[str, Tensor],
    *,
    scenario: str,
    n_classes: int,
    mean: float | Sequence[float],
    std: float | Sequence[float],
    seed: int = 0,
    pixel_scale: float = 255.0,
) -> Benchmark:
    """Experiences given by ``e_train`` / ``e_test`` (0..E-1 per sample). Labels keep one label
    space in every scenario; the scenario decides the task labels (``t_*`` if given, else the
    experience index, in ``task``; 0 otherwise)."""
    _check_scenario(scenario)
    n_experiences = int(data["e_train"].max()) + 1

    def stream(x: Tensor, y: Tensor, e: Tensor, t: Tensor | None) -> list[Experience]:
        exps = []
        for i in range(n_experiences):
            idx = torch.nonzero(e == i).squeeze(1)
            exps.append(experience_of(i, x, y[idx].long(), t, idx, scenario))
        return exps

    return Benchmark(
        name=name,
        scenario=scenario,
        train_stream=stream(data["x_train"], data["y_train"], data["e_train"], data.get("t_train")),
        test_stream=stream(data["x_test"], data["y_test"], data["e_test"], data.get("t_test")),
        n_classes=n_classes,
        input_shape=tuple(_as_images(data["x_train"][:1]).shape[1:]),
        mean=_tuple_or_float(mean),
        std=_tuple_or_float(std),
        seed=seed,
        pixel_scale=pixel_scale,
    )


def image_folder(
    path: str | None = None,
    image_size: int = 32,
    test_fraction: float = 0.2,
    scenario: str = "class",
    n_experiences: int = 5,
    first_experience_classes: int | None = None,
    class_order: Sequence[int] | str | None = None,
    seed: int = 0,
    augment: bool = True,
    online: bool = False,
    online_batch_size: int = 10,
    validation: float = 0.0,
) -> Benchmark:
    """Class-per-folder image trees (``path/<class>/<image>``; or ``path/train/<class>/...`` and
    ``path/test/<class>/...`` (or ``val``)), read with torchvision's ``ImageFolder``, resized
    (shorter side) and centre-cropped to ``image_size``, held in memory as uint8 and split by
    class. Needs torchvision (the ``vision`` extra)."""
    from clrun.datasets import require_torchvision

    tv = require_torchvision("benchmark=image_folder")
    if path is None:
        raise ValueError("benchmark=image_folder needs benchmark.path=<folder of class folders>")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ValueError(f"benchmark.path={str(root)!r} is not a folder")
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    train_dir = root / "train" if test_dir is not None and (root / "train").is_dir() else root
    T = tv.transforms
    load = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])

    def read(folder: Path) -> tuple[dict[str, Tensor], list[str]]:
        ds = tv.datasets.ImageFolder(str(folder), transform=load)  # decodes to RGB
        xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
        return {"x": torch.stack(xs), "y": torch.tensor(ys)}, ds.classes

    train, classes = read(train_dir)
    if test_dir is not None:
        test, test_classes = read(test_dir)
        if test_classes != classes:
            raise ValueError(f"{test_dir} has class folders {test_classes}, {train_dir} {classes}")
    else:
        train, test = _holdout(train, test_fraction, seed)
    m, s = _channel_stats(train["x"])
    data = {"x_train": train["x"], "y_train": train["y"], "x_test": test["x"], "y_test": test["y"]}
    b = split_by_class(
        "image_folder",
        data,
        scenario=scenario,
        n_experiences=n_experiences,
        class_order=class_order,
        seed=seed,
        mean=tuple(v / 255 for v in m),
        std=tuple(v / 255 for v in s),
        first_experience_classes=first_experience_classes,
        n_classes=len(classes),
    )
    b.info.update(path=str(root), classes=classes)
    return _finish(
        b,
        augment=augment,
        online=online,
        online_batch_size=online_batch_size,
        validation=validation,
    )
