"""Benchmarks: splits, layouts, augmentation, normalisation, online streams, your own files.

Datasets are replaced by small generated arrays (``fake_dataset``); the one ``slow`` test runs
Split Fashion-MNIST on the real data.
"""

import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import assert_learned, compose_with_choices, has_torchvision, make_cfg
from test_datasets import make_cifar, make_cifar_archive, official, write_files

from clrun import benchmarks as bm
from clrun import datasets as ds
from clrun.config import ConfigError, build


@pytest.fixture
def fake_dataset(monkeypatch):
    """load_dataset → small random arrays of the right shapes (MNIST family or CIFAR)."""
    calls = []

    def load(name, data_dir=None, path=None):
        calls.append((name, path))
        g = torch.Generator().manual_seed(0)
        shape = (3, 32, 32) if name.startswith("cifar") else (28, 28)
        n_cls = 100 if name == "cifar100" else 10
        n_train, n_test = (n_cls * 6, n_cls * 2)
        out = {}
        for split, n in (("train", n_train), ("test", n_test)):
            out[f"x_{split}"] = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
            out[f"y_{split}"] = torch.arange(n) % n_cls
            if name == "cifar100":
                out[f"y_{split}_coarse"] = out[f"y_{split}"] // 5
        return out

    monkeypatch.setattr(ds, "load_dataset", load)
    return calls


def sizes(stream):
    return [len(ex) for ex in stream]


def classes(stream):
    return [ex.classes for ex in stream]


# ---------------------------------------------------------------- splits and layouts


@pytest.mark.parametrize("scenario", ["class", "task", "domain"])
def test_split_fmnist_and_cifar10_scenarios(fake_dataset, scenario):
    for build_fn in (bm.split_fmnist, bm.split_cifar10):
        b = build_fn(scenario=scenario)
        assert len(b.train_stream) == len(b.test_stream) == 5
        assert classes(b.train_stream) == (
            [[0, 1]] * 5 if scenario == "domain" else [[2 * i, 2 * i + 1] for i in range(5)]
        )
        assert b.n_classes == (2 if scenario == "domain" else 10)
        assert [ex.t.unique().tolist() for ex in b.test_stream] == [
            [i if scenario == "task" else 0] for i in range(5)
        ]
    assert b.input_shape == (3, 32, 32) and b.mean == bm.CIFAR10_MEAN
    assert isinstance(b.augmentation, bm.RandomCropFlip) and b.augmentation.padding == 4
    assert fake_dataset[-1] == ("cifar10", None)


def test_split_cifar100_layouts(fake_dataset):
    b = bm.split_cifar100()
    icarl = np.random.RandomState(1993).permutation(100).tolist()
    assert b.info["class_order"] == icarl and icarl[:3] == [68, 56, 78]
    assert [len(c) for c in classes(b.train_stream)] == [10] * 10
    assert b.train_stream[0].classes == sorted(icarl[:10])
    b = bm.split_cifar100(n_experiences=20)
    assert [len(c) for c in classes(b.train_stream)] == [5] * 20
    b = bm.split_cifar100(n_experiences=6, first_experience_classes=50, scenario="task")
    assert [len(c) for c in classes(b.train_stream)] == [50, 10, 10, 10, 10, 10]
    assert b.info["classes_per_experience"] == [50, 10, 10, 10, 10, 10] and b.n_classes == 100
    assert sorted(c for cs in classes(b.test_stream) for c in cs) == list(range(100))
    b = bm.split_cifar100(labels="coarse", n_experiences=5, class_order=list(range(20)))
    assert classes(b.train_stream)[0] == [0, 1, 2, 3] and b.n_classes == 20
    with pytest.raises(ValueError, match=r"first_experience_classes=50 .* split the remaining 50"):
        bm.split_cifar100(n_experiences=4, first_experience_classes=50)
    with pytest.raises(ValueError, match="scenario=domain needs experiences of equal size"):
        bm.split_cifar100(n_experiences=6, first_experience_classes=50, scenario="domain")
    with pytest.raises(ValueError, match="must divide the 100 classes"):
        bm.split_cifar100(n_experiences=7)
    with pytest.raises(ValueError, match="labels='medium'"):
        bm.split_cifar100(labels="medium")


def test_vandeven_class_order_gives_the_authors_digit_pairs():
    """Their code relabels digit c as p[c], p = numpy's permutation of the seed (seed 0: none),
    and context t takes the new labels 2t, 2t+1; in domain-IL a digit's label is p[c] mod 2."""
    p = [2, 9, 6, 4, 0, 3, 1, 7, 8, 5]  # numpy.random.RandomState(1).permutation(10)
    pairs = [sorted(c for c in range(10) if p[c] // 2 == t) for t in range(5)]
    assert pairs == [[4, 6], [0, 5], [3, 9], [2, 7], [1, 8]]
    kw = {"n_classes": 10, "train_per_class": 3, "test_per_class": 2, "seed": 1}
    b = bm.synthetic(class_order="vandeven", **kw)
    assert classes(b.train_stream) == pairs
    domain = bm.synthetic(scenario="domain", class_order="vandeven", **kw)
    for ex, ex_d in zip(b.train_stream, domain.train_stream, strict=True):
        assert ex_d.y.tolist() == [p[c] % 2 for c in ex.y.tolist()]
    b0 = bm.synthetic(class_order="vandeven", **{**kw, "seed": 0})
    assert classes(b0.train_stream) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match=r"class_order='vandevan' .* named orders vandeven"):
        bm.synthetic(class_order="vandevan", **kw)


def test_split_cifar10_from_a_generated_official_archive(tmp_path, monkeypatch):
    files, arrays = make_cifar("cifar10", n_train=4, n_test=2)
    archive = make_cifar_archive("cifar10", files)
    official(monkeypatch, "cifar10", files, archive)
    write_files(tmp_path / "cifar10" / "raw", {"cifar-10-python.tar.gz": archive})
    b = bm.split_cifar10(data_dir=str(tmp_path), class_order=None, seed=3)
    x = torch.cat([ex.x for ex in b.train_stream])
    assert x.shape[1:] == (3, 32, 32) and len(x) == len(arrays["y_train"])
    assert sorted(map(tuple, x.flatten(1).tolist())) == sorted(
        map(tuple, arrays["x_train"].reshape(len(x), -1).tolist())
    )


# ---------------------------------------------------------------- permuted / rotated: flat memory


@pytest.mark.parametrize("name", ["permuted_mnist", "rotated_mnist"])
def test_fifty_domain_experiences_share_one_copy_of_the_data(fake_dataset, name):
    b = getattr(bm, name)(n_experiences=50)
    for stream in (b.train_stream, b.test_stream):
        assert len(stream) == 50
        assert len({ex.x.data_ptr() for ex in stream}) == 1  # one storage behind all 50
    x0 = b.train_stream[0].x
    assert x0.untyped_storage().nbytes() == x0.numel()  # exactly one copy of the images
    # moving to a device keeps the sharing (one transfer, not 50)
    moved = b.to("meta")
    assert all(ex.x is moved.train_stream[0].x for ex in moved.train_stream)
    # the transform is applied per batch, by each sample's experience
    b = getattr(bm, name)(n_experiences=50)
    ex3, ex40 = b.train_stream[3], b.train_stream[40]
    a = b.prepare(ex3.x[:4], ex3.e[:4])
    c = b.prepare(ex40.x[:4], ex40.e[:4])
    assert torch.equal(ex3.x[:4], ex40.x[:4]) and not torch.allclose(a, c)
    assert torch.allclose(b.prepare(ex3.x[:4], torch.full((4,), 40)), c)


def test_online_domain_stream_stays_flat(fake_dataset):
    b = bm.permuted_mnist(n_experiences=50, online=True, online_batch_size=25)
    assert len(b.train_stream) == 50 * 3  # 60 samples: 25 + 25 + 10
    assert len({ex.x.untyped_storage().data_ptr() for ex in b.train_stream}) == 1


# ---------------------------------------------------------------- augmentation and prepare


def test_random_crop_flip_is_a_padded_window_of_each_sample():
    x = torch.randint(0, 256, (16, 3, 10, 12), dtype=torch.uint8)
    aug = bm.RandomCropFlip(padding=3, flip=True)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    out = aug(x, g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    g.set_state(state)  # redraw the same offsets and flips, and check sample by sample
    offsets = torch.randint(0, 7, (2, 16), generator=g)
    flips = torch.randint(0, 2, (16,), generator=g).bool()
    padded = torch.nn.functional.pad(x, (3, 3, 3, 3))
    for i in range(16):
        oy, ox = offsets[:, i].tolist()
        window = padded[i, :, oy : oy + 10, ox : ox + 12]
        assert torch.equal(out[i], window.flip(-1) if flips[i] else window)
    assert 0 < flips.sum() < 16
    # determinism: same seed, same batch; the stream of batches differs from batch to batch
    a = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(5)))
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(aug(x, g), aug(x, g))
    assert torch.equal(bm.RandomCropFlip(padding=0, flip=False)(x, g), x)


def test_prepare_augments_only_when_training_and_resumes_from_state_dict():
    b = bm.synthetic(image_size=16, augment=True, seed=4)
    assert b.augmentation.padding == 2
    x, e = b.train_stream[0].x[:8], b.train_stream[0].e[:8]
    plain = b.prepare(x, e)
    assert torch.equal(plain, b.prepare(x, e))  # evaluation: no augmentation, no randomness
    state = b.state_dict()
    first = [b.prepare(x, e, train=True) for _ in range(3)]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], plain)
    fresh = bm.synthetic(image_size=16, augment=True, seed=4)  # a resumed run
    fresh.load_state_dict(state)
    assert all(torch.equal(a, fresh.prepare(x, e, train=True)) for a in first)
    assert torch.equal(
        bm.synthetic(image_size=16, augment=True, seed=4).prepare(x, e, train=True), first[0]
    )


def test_per_channel_normalisation_and_the_scalar_case_unchanged(fake_dataset):
    b = bm.split_cifar10()
    x = b.train_stream[0].x[:5]
    out = b.prepare(x, b.train_stream[0].e[:5])
    mean = torch.tensor(bm.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(bm.CIFAR10_STD).view(3, 1, 1)
    assert torch.allclose(out, (x.float() / 255 - mean) / std, atol=1e-5)
    m = bm.split_mnist()
    x = m.train_stream[0].x[:5]
    expected = x.float().sub_(255.0 * bm.MNIST_MEAN).mul_(1.0 / (255.0 * bm.MNIST_STD))
    assert torch.equal(m.prepare(x, m.train_stream[0].e[:5]), expected)  # bit for bit
    with pytest.raises(
        ValueError,
        match=r"benchmark.mean=\(0.5, 0.5\) is not allowed: .* a list of 3 \(one per channel",
    ):
        bm.Benchmark("b", "class", [], [], 2, (3, 4, 4), (0.5, 0.5), 0.2)


@pytest.mark.parametrize("name", ["split_mnist", "split_fmnist"])
def test_zero_padding_and_unnormalised_inputs(fake_dataset, name):
    """pad=2: 28×28 → 32×32 with a black border around the untouched image; normalize=false:
    pixels / 255 in [0, 1] (van de Ven et al.'s inputs); the defaults are unchanged."""
    plain = getattr(bm, name)()
    b = getattr(bm, name)(pad=2, normalize=False)
    assert plain.input_shape == (1, 28, 28) and b.input_shape == (1, 32, 32)
    for ex_plain, ex in zip(
        plain.train_stream + plain.test_stream, b.train_stream + b.test_stream, strict=True
    ):
        assert ex.x.dtype == torch.uint8 and ex.x.shape[-2:] == (32, 32)
        assert torch.equal(ex.x[..., 2:30, 2:30], ex_plain.x)
        border = ex.x.clone()
        border[..., 2:30, 2:30] = 0
        assert int(border.sum()) == 0
    x, e = b.train_stream[0].x[:5], b.train_stream[0].e[:5]
    out = b.prepare(x, e)
    assert (
        torch.allclose(out, x.float() / 255, atol=1e-7) and float(out[..., 0, :].abs().max()) == 0
    )
    assert b.info["pad"] == 2 and b.info["normalize"] is False
    for kwargs, message in (
        ({"pad": -1}, "benchmark.pad=-1"),
        ({"pad": True}, "benchmark.pad=True"),
        ({"normalize": "no"}, "benchmark.normalize='no'"),
    ):
        with pytest.raises(ValueError, match=message):
            getattr(bm, name)(**kwargs)


def test_zero_padding_in_a_run_config(fake_dataset):
    cfg = make_cfg("benchmark=split_mnist", "benchmark.pad=2", "benchmark.normalize=false")
    b = build(cfg.benchmark, "benchmark")
    assert b.input_shape == (1, 32, 32)
    s = build(
        make_cfg("benchmark=synthetic", "benchmark.pad=1", "benchmark.normalize=false").benchmark,
        "benchmark",
    )
    x = s.train_stream[0].x[:3]
    assert s.input_shape == (1, 10, 10) and int(x[..., 0, :].sum()) == 0
    assert torch.allclose(s.prepare(x, s.train_stream[0].e[:3]), x.float() / 255)
    with pytest.raises(ConfigError, match="benchmark.pad=-2"):
        build(make_cfg("benchmark=split_mnist", "benchmark.pad=-2").benchmark, "benchmark")


def test_augment_needs_images(tmp_path):
    np.savez(tmp_path / "v.npz", x=np.random.rand(40, 6).astype(np.float32), y=np.arange(40) % 4)
    with pytest.raises(ValueError, match=r"augment=true needs image inputs \(C, H, W\)"):
        bm.from_files(str(tmp_path / "v.npz"), n_experiences=2, augment=True)


# ---------------------------------------------------------------- online streams


def test_online_stream_sizes_and_origins():
    offline = bm.synthetic(train_per_class=45, test_per_class=5)
    b = bm.synthetic(train_per_class=45, test_per_class=5, online=True, online_batch_size=16)
    per_exp = math.ceil(90 / 16)  # 2 classes × 45 samples in 16-sample mini-experiences
    assert len(b.train_stream) == 5 * per_exp
    assert sizes(b.train_stream[:per_exp]) == [16] * 5 + [10]
    assert [ex.index for ex in b.train_stream] == list(range(5 * per_exp))
    assert b.train_origin == [i for i in range(5) for _ in range(per_exp)]
    assert [b.origin(i) for i in (0, per_exp - 1, per_exp)] == [0, 0, 1]
    ends = [i for i in range(len(b.train_stream)) if b.ends_experience(i)]
    assert ends == [per_exp * (i + 1) - 1 for i in range(5)]
    assert sizes(b.test_stream) == sizes(offline.test_stream)  # one test experience per original
    for i, ex in enumerate(offline.train_stream):  # the minis of i hold exactly its samples
        minis = [m for k, m in enumerate(b.train_stream) if b.origin(k) == i]
        assert all(torch.equal(m.e, torch.full_like(m.e, i)) for m in minis)
        key = lambda xs, ys: sorted(zip(xs.flatten(1).sum(1).tolist(), ys.tolist(), strict=True))  # noqa: E731
        got = bm.concat(minis, i)
        assert key(got.x, got.y) == key(ex.x, ex.y)
    # shuffled (not class-sorted) and seeded
    assert len(b.train_stream[0].classes) == 2
    again = bm.synthetic(train_per_class=45, test_per_class=5, online=True, online_batch_size=16)
    assert torch.equal(again.train_stream[7].x, b.train_stream[7].x)
    assert not bm.synthetic().train_origin and bm.synthetic().ends_experience(0)
    with pytest.raises(ValueError, match="online_batch_size=0"):
        bm.synthetic(online=True, online_batch_size=0)


def test_online_run_writes_one_row_per_original_experience(run_debug):
    summary, run_dir = run_debug(
        "benchmark.online=true", "benchmark.online_batch_size=100", "strategy.epochs=1"
    )
    rows = (run_dir / "acc_matrix.csv").read_text().strip().splitlines()[1:]
    assert summary["status"] == "completed" and len(rows) == 5
    assert_learned(run_dir)


# ---------------------------------------------------------------- your own files


def test_from_files_round_trip_npz_and_pt(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (120, 3, 6, 6), dtype=np.uint8)
    y = np.repeat([10, 20, 30, 40, 50, 60], 20)  # any integer labels
    t = y // 30
    np.savez(tmp_path / "train.npz", x=x, y=y, t=t)
    torch.save(
        {
            "x": torch.from_numpy(x[::4]),
            "y": torch.from_numpy(y[::4]),
            "t": torch.from_numpy(t[::4]),
        },
        tmp_path / "test.pt",
    )
    b = bm.from_files(
        str(tmp_path / "train.npz"), str(tmp_path / "test.pt"), n_experiences=3, class_order=None
    )
    assert b.input_shape == (3, 6, 6) and b.n_classes == 6 and b.pixel_scale == 255
    assert b.info["label_values"] == [10, 20, 30, 40, 50, 60]
    got = torch.cat([ex.x for ex in b.train_stream])
    assert sorted(map(tuple, got.flatten(1).tolist())) == sorted(
        map(tuple, x.reshape(120, -1).tolist())
    )
    for ex in b.train_stream:  # each sample keeps its own (relabelled) label
        for xi, yi in zip(ex.x[:3], ex.y[:3], strict=True):
            row = np.nonzero((x == xi.numpy()).all(axis=(1, 2, 3)))[0][0]
            assert [10, 20, 30, 40, 50, 60][int(yi)] == y[row]
    assert sizes(b.test_stream) == [10, 10, 10] and sizes(b.train_stream) == [40, 40, 40]
    assert len(b.mean) == 3 and all(0.3 < m < 0.7 for m in b.mean)  # from the training data
    task = bm.from_files(
        str(tmp_path / "train.npz"),
        str(tmp_path / "test.pt"),
        n_experiences=3,
        scenario="task",
        class_order=list(range(6)),
    )
    assert task.train_stream[0].t.unique().tolist() == [0]  # t of the file: 10 // 30, 20 // 30
    assert task.train_stream[2].t.unique().tolist() == [1, 2]


def test_from_files_vectors_by_experience_column(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 2.0, (90, 7)).astype(np.float32)
    y, exp = np.arange(90) % 3, np.repeat([7, 3, 5], 30)  # experiences in sorted order: 3, 5, 7
    np.savez(tmp_path / "data.npz", x=x, y=y, exp=exp)
    b = bm.from_files(str(tmp_path / "data.npz"), split_by="column", n_experiences=3, seed=2)
    assert b.input_shape == (7,) and b.pixel_scale == 1.0 and b.n_classes == 3
    assert b.info["exp_values"] == [3, 5, 7]
    assert sum(sizes(b.train_stream)) + sum(sizes(b.test_stream)) == 90
    assert sum(sizes(b.test_stream)) == 18  # test_fraction 0.2
    first = torch.from_numpy(x[30:60])
    assert all(any(torch.equal(r, f) for f in first) for r in b.train_stream[0].x)
    out = b.prepare(b.train_stream[0].x, b.train_stream[0].e)
    assert out.shape == (len(b.train_stream[0]), 7) and abs(float(out.mean())) < 0.5
    stored = b.train_stream[0].x.clone()
    b.prepare(b.train_stream[0].x[:5], b.train_stream[0].e[:5])  # a view of float storage
    assert torch.equal(stored, b.train_stream[0].x)  # prepare never writes into the data
    with pytest.raises(
        ValueError, match=r"exp column has 3 experiences: set benchmark.n_experiences=3"
    ):
        bm.from_files(str(tmp_path / "data.npz"), split_by="column", n_experiences=2)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 2), np.uint8)}, r"has no 'y'; it holds \['x'\], and needs x"),
        ({"x": np.zeros((4, 2), np.uint8), "y": np.zeros(3, int)}, "y has shape"),
        ({"x": np.zeros((4, 8, 8, 3), np.uint8), "y": np.zeros(4, int)}, "channels-last"),
        ({"x": np.zeros((4, 2), np.int64), "y": np.zeros(4, int)}, "uint8"),
        ({"x": np.zeros((4, 2), np.uint8), "y": np.zeros(4)}, "1-D integer"),
        ({"x": np.zeros(4, np.uint8), "y": np.zeros(4, int)}, r"expected \(N, C, H, W\)"),
    ],
)
def test_from_files_clear_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        bm.from_files(str(tmp_path / "bad.npz"))


def test_from_files_needs_a_path_and_it_fails_as_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"benchmark=from_files needs benchmark.path="):
        build(make_cfg("benchmark=from_files").benchmark, "benchmark")
    cfg = make_cfg("benchmark=from_files", f"benchmark.path={tmp_path}/missing.npz")
    with pytest.raises(ConfigError, match="missing.npz'?: no such file"):
        build(cfg.benchmark, "benchmark")


def test_from_files_runs_end_to_end(run_debug, tmp_path):
    g = torch.Generator().manual_seed(0)
    protos = torch.rand(4, 1, 8, 8, generator=g) * 255
    y = torch.arange(4).repeat(60)
    x = (protos[y] + 30 * torch.randn(len(y), 1, 8, 8, generator=g)).clamp(0, 255).byte()
    torch.save({"x": x, "y": y}, tmp_path / "mine.pt")
    summary, run_dir = run_debug(
        "benchmark=from_files", f"benchmark.path={tmp_path}/mine.pt", "benchmark.n_experiences=2"
    )
    assert summary["status"] == "completed" and summary["benchmark"] == "from_files"
    assert json.loads((run_dir / "summary.json").read_text())["final_avg_acc"] > 0.4


def test_augmented_cnn_run_end_to_end(run_debug):
    summary, run_dir = run_debug(
        "benchmark.augment=true", "model=cnn", "benchmark.scenario=task", "model.head=multi"
    )
    assert summary["status"] == "completed" and summary["model"] == "cnn"
    assert_learned(run_dir)  # through random crops and flips of the 8×8 images


# ---------------------------------------------------------------- optional torchvision


def test_image_folder_without_torchvision(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    with pytest.raises(ValueError, match=r"benchmark=image_folder needs torchvision"):
        bm.image_folder(str(tmp_path))
    cfg, _ = compose_with_choices("benchmark=image_folder", f"benchmark.path={tmp_path}")
    with pytest.raises(ConfigError, match=r"pip install 'clrun\[vision\]'"):
        build(cfg.benchmark, "benchmark")


@pytest.mark.skipif(not has_torchvision(), reason="needs an importable torchvision")
def test_image_folder_with_torchvision(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("cat", "dog", "eel", "fox"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    b = bm.image_folder(str(tmp_path), image_size=16, n_experiences=2, class_order=[0, 1, 2, 3])
    assert b.input_shape == (3, 16, 16) and b.info["classes"] == ["cat", "dog", "eel", "fox"]
    assert sizes(b.train_stream) == [12, 12] and sizes(b.test_stream) == [4, 4]


# ---------------------------------------------------------------- the real data


@pytest.mark.slow
def test_real_split_fmnist_naive_forgets_and_replay_remembers(tmp_path):
    from clrun.run import run

    results = {}
    for strategy in ("naive", "replay"):
        cfg, choices = compose_with_choices(
            "benchmark=split_fmnist",
            f"strategy={strategy}",
            "strategy.epochs=1",
            "buffer=class_balanced",
            "buffer.max_size=1000",
            "threads=1",
        )
        results[strategy] = run(cfg, tmp_path / strategy, choices)
    assert results["naive"]["final_avg_acc"] < 0.3 < 0.6 < results["replay"]["final_avg_acc"]


@pytest.mark.parametrize("name", ["permuted_mnist", "rotated_mnist"])
def test_train_samples_per_experience_draws_a_subset_per_experience(fake_dataset, name):
    b = getattr(bm, name)(n_experiences=3, train_samples_per_experience=7, scenario="task")
    assert [len(ex) for ex in b.train_stream] == [7, 7, 7]
    assert [len(ex) for ex in b.test_stream] == [20, 20, 20]  # the whole test set
    full = getattr(bm, name)(n_experiences=1).train_stream[0]
    rows = {bytes(r.numpy()) for r in full.x}
    assert all(bytes(r.numpy()) in rows for ex in b.train_stream for r in ex.x)  # real samples
    assert not torch.equal(b.train_stream[0].x, b.train_stream[1].x)  # each its own subset
    assert [ex.t.unique().tolist() for ex in b.train_stream] == [[0], [1], [2]]
    again = getattr(bm, name)(n_experiences=3, train_samples_per_experience=7, scenario="task")
    assert torch.equal(again.train_stream[2].x, b.train_stream[2].x)  # seeded
    for bad in (0, 61, True):
        with pytest.raises(ValueError, match=f"train_samples_per_experience={bad!r}"):
            getattr(bm, name)(n_experiences=2, train_samples_per_experience=bad)


@pytest.mark.parametrize("name", ["permuted_mnist", "rotated_mnist"])
def test_domain_benchmarks_unnormalised_inputs(fake_dataset, name):
    """normalize=false: the transformed pixels / 255, in [0, 1] (GEM's and A-GEM's inputs);
    normalize=true (the default) standardises the same pixels with MNIST's mean and std."""
    plain = getattr(bm, name)(n_experiences=2)
    raw = getattr(bm, name)(n_experiences=2, normalize=False)
    assert plain.info["normalize"] is True and raw.info["normalize"] is False
    ex = raw.train_stream[1]
    x, e = ex.x[:5], ex.e[:5]
    out = raw.prepare(x, e)
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    assert torch.allclose(out, raw.transform(x.float(), e) / 255, atol=1e-6)
    std = plain.prepare(x, e) * bm.MNIST_STD + bm.MNIST_MEAN
    assert torch.allclose(std, out, atol=1e-5)
    cfg = make_cfg(f"benchmark={name}", "benchmark.normalize=false")
    assert build(cfg.benchmark, "benchmark").info["normalize"] is False
    with pytest.raises(ValueError, match="benchmark.normalize='no'"):
        getattr(bm, name)(n_experiences=2, normalize="no")


def test_permuted_mnist_pads_before_permuting(fake_dataset):
    """pad=2 (van de Ven & Tolias): 32×32 images whose 1024 pixels, the black border included,
    are permuted; the pixels of the original image are all still there."""
    b = bm.permuted_mnist(n_experiences=2, pad=2, normalize=False)
    assert tuple(b.input_shape)[1:] == (32, 32) and b.info["pad"] == 2
    ex = b.train_stream[1]
    out = b.prepare(ex.x[:3], ex.e[:3])
    assert out.shape[1:] == (1, 32, 32)
    plain = bm.permuted_mnist(n_experiences=1, normalize=False).train_stream[0].x[:3]
    for i in range(3):  # the same pixel values (a permutation of the padded image)
        want = torch.cat(
            [plain[i].flatten().float() / 255, torch.zeros(32 * 32 - plain[i].numel())]
        )
        assert torch.allclose(out[i].flatten().sort().values, want.sort().values, atol=1e-6)
    with pytest.raises(ValueError, match="benchmark.pad=-1"):
        bm.permuted_mnist(n_experiences=2, pad=-1)
