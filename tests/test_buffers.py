import math

import torch

from clrun.benchmarks import Experience
from clrun.buffers import ClassBalancedBuffer, ReservoirBuffer


def stream(n: int, n_classes: int = 10, start: int = 0, exp: int = 0) -> Experience:
    ids = torch.arange(start, start + n)
    x = (ids % 256).to(torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
    y = ids % n_classes
    return Experience(exp, x, y, torch.zeros_like(y), torch.full_like(y, exp))


def test_reservoir_never_exceeds_capacity_and_keeps_compact_dtype():
    buf = ReservoirBuffer(max_size=50, seed=0)
    for k in range(10):
        buf.update(stream(37, start=37 * k))
        assert len(buf) == min(50, 37 * (k + 1))
    assert buf.data["x"].dtype == torch.uint8
    assert buf.seen == 370


def test_reservoir_is_uniform_over_the_stream():
    # 200 samples through a buffer of 20, repeated: each sample should be kept with p = 0.1.
    n, size, trials = 200, 20, 1000
    counts = torch.zeros(n)
    for trial in range(trials):
        buf = ReservoirBuffer(max_size=size, seed=trial)
        for k in range(0, n, 30):  # chunks of uneven size, like minibatches
            buf.update(stream(min(30, n - k), n_classes=n, start=k))
        counts[buf.data["y"]] += 1
    expected = trials * size / n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # chi-square with 199 dof: mean 199, sd ≈ 20; 300 is p < 1e-5.
    assert chi2 < 300, chi2
    # and the per-chunk ordering does not bias early vs late samples
    assert abs(counts[:100].mean() - counts[100:].mean()) < 0.1 * expected


def test_reservoir_state_round_trip_continues_identically():
    a = ReservoirBuffer(max_size=16, seed=3)
    a.update(stream(40))
    b = ReservoirBuffer(max_size=16, seed=99)
    b.load_state_dict(a.state_dict())
    a.update(stream(40, start=40))
    b.update(stream(40, start=40))
    assert torch.equal(a.data["y"], b.data["y"])


def test_class_balanced_shares_capacity_equally():
    buf = ClassBalancedBuffer(max_size=100, groupby="class", seed=0)
    buf.update(stream(400, n_classes=2))  # classes 0, 1
    assert torch.bincount(buf.data["y"]).tolist() == [50, 50]
    buf.update(stream(600, n_classes=5, start=1000))  # adds classes 2, 3, 4 (and more of 0, 1)
    counts = torch.bincount(buf.data["y"], minlength=5).tolist()
    assert counts == [20, 20, 20, 20, 20]


def test_class_balanced_uneven_capacity_and_resize():
    buf = ClassBalancedBuffer(max_size=10, groupby="class", seed=0)
    buf.update(stream(90, n_classes=3))
    assert sorted(torch.bincount(buf.data["y"]).tolist()) == [3, 3, 4]
    buf.resize(6)
    assert torch.bincount(buf.data["y"]).tolist() == [2, 2, 2]
    assert len(buf) == 6


def test_class_balanced_by_experience():
    buf = ClassBalancedBuffer(max_size=30, groupby="experience", seed=0)
    for e in range(3):
        buf.update(stream(100, exp=e, start=100 * e))
    assert torch.bincount(buf.data["e"]).tolist() == [10, 10, 10]


def test_bad_buffer_arguments_are_rejected():
    for kwargs in ({"max_size": 0}, {"max_size": -1}, {"max_size": 1.5}):
        try:
            ReservoirBuffer(**kwargs)
        except ValueError as e:
            assert "buffer.max_size" in str(e)
        else:
            raise AssertionError(kwargs)
    try:
        ClassBalancedBuffer(10, groupby="colour")
    except ValueError as e:
        assert "buffer.groupby" in str(e) and "class" in str(e)
    else:
        raise AssertionError


def test_sample_draws_without_replacement():
    buf = ReservoirBuffer(max_size=64, seed=0)
    buf.update(stream(64, n_classes=64))
    s = buf.sample(32)
    assert len(s) == 32 and len(set(s.y.tolist())) == 32
    assert len(buf.sample(1000)) == 64
    assert math.isclose(float(buf.data["y"].float().mean()), 31.5)
