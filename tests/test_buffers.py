import math

import pytest
import torch

from clrun.benchmarks import Experience
from clrun.buffers import ClassBalancedBuffer, ReservoirBuffer, rank


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


def test_class_balanced_max_per_group_is_a_fixed_budget_per_class():
    buf = ClassBalancedBuffer(max_size=100, groupby="class", seed=0, max_per_group=20)
    buf.update(stream(400, n_classes=2))  # two classes: 20 each, not 50
    assert torch.bincount(buf.data["y"]).tolist() == [20, 20]
    buf.update(stream(600, n_classes=5, start=1000))
    assert torch.bincount(buf.data["y"], minlength=5).tolist() == [20] * 5
    buf.update(stream(1000, n_classes=10, start=2000))  # the total capacity still bounds it
    assert torch.bincount(buf.data["y"], minlength=10).tolist() == [10] * 10
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="buffer.max_per_group"):
            ClassBalancedBuffer(10, max_per_group=bad)


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


# --------------------------------------------------------------------------- ranked selection

# 1-D features, mean 3. Herding: 3; then 2 (mean 2.5, vs 3.75 with 4.5); 4.5 (3.17); 1 (2.63);
# 7.5 (3.6, vs 2.1 with 0); 0. Closest to the centre: 3, 2, 4.5, 1, 0, 7.5.
TOY = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.5, 7.5])


def toy_features(samples: Experience) -> torch.Tensor:
    return TOY[samples.x.view(len(samples), -1)[:, 0].long()].unsqueeze(1)


def test_herding_and_closest_to_center_on_a_known_set():
    assert rank(TOY.unsqueeze(1).double(), "herding", 6).tolist() == [3, 2, 4, 1, 5, 0]
    assert rank(TOY.unsqueeze(1).double(), "closest_to_center", 6).tolist() == [3, 2, 4, 1, 0, 5]


def test_herding_is_the_greedy_mean_matching_rule():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 3, generator=g, dtype=torch.float64)
    mu, chosen = f.mean(0), []
    for i in range(1, 11):  # the rule written out: argmin ||mu - (sum of chosen + f) / i||
        dist = ((mu - (f[chosen].sum(0) + f) / i) ** 2).sum(1)
        dist[chosen] = float("inf")
        chosen.append(int(dist.argmin()))
    assert rank(f, "herding", 10).tolist() == chosen


def test_class_balanced_ranked_selection_keeps_rank_order_and_shrinks_by_dropping_the_last():
    exp = stream(6, n_classes=1)  # x = 0..5 → features TOY
    herd = ClassBalancedBuffer(max_size=5, selection="herding")
    herd.update(exp, features=toy_features)
    assert herd.data["x"][:, 0, 0, 0].tolist() == [3, 2, 4, 1, 5]
    near = ClassBalancedBuffer(max_size=5, selection="closest_to_center")
    near.update(exp, features=toy_features)
    assert near.data["x"][:, 0, 0, 0].tolist() == [3, 2, 4, 1, 0]
    herd.resize(2)  # iCaRL's reduction: no features needed
    assert herd.data["x"][:, 0, 0, 0].tolist() == [3, 2]
    with pytest.raises(
        ValueError, match="buffer.selection=herding ranks samples by their features"
    ):
        herd.update(exp)
    with pytest.raises(ValueError, match="buffer.selection='best'"):
        ClassBalancedBuffer(10, selection="best")


def test_ranked_selection_per_class_with_new_classes():
    buf = ClassBalancedBuffer(max_size=4, selection="closest_to_center")
    ids = torch.arange(12)
    x = ids.to(torch.uint8).view(-1, 1, 1, 1)
    y = ids // 6  # class 0: ids 0-5, class 1: ids 6-11

    def feats(s: Experience) -> torch.Tensor:
        return (s.x.view(-1).double() % 6).unsqueeze(1)  # both classes: features 0..5, mean 2.5

    first = Experience(
        0, x[:6], y[:6], torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long)
    )
    buf.update(first, features=feats)
    assert buf.data["x"].view(-1).tolist() == [2, 3, 1, 4]
    second = Experience(
        1, x[6:], y[6:], torch.zeros(6, dtype=torch.long), torch.ones(6, dtype=torch.long)
    )
    buf.update(second, features=feats)  # class 0 is cut to its two best, class 1 ranked afresh
    assert buf.data["x"].view(-1).tolist() == [2, 3, 8, 9]


# --------------------------------------------------------------------------- extra fields


def test_extra_fields_follow_their_samples_through_reservoir_updates_and_state():
    buf = ReservoirBuffer(max_size=16, seed=1)
    for k in range(5):
        s = stream(10, n_classes=100, start=10 * k)
        buf.update(s, logits=s.y.float().unsqueeze(1).expand(-1, 3) * 2)
    assert buf.data["logits"].shape == (16, 3)
    assert torch.equal(buf.get("logits")[:, 0], buf.data["y"].float() * 2)
    idx = buf.sample_index(4)
    assert torch.equal(buf.get("logits", idx)[:, 1], buf.samples(idx).y.float() * 2)
    buf.set("logits", idx, torch.zeros(4, 3))
    assert torch.equal(buf.get("logits", idx), torch.zeros(4, 3))
    copy = ReservoirBuffer(max_size=16, seed=9)
    copy.load_state_dict(buf.state_dict())
    assert torch.equal(copy.get("logits"), buf.get("logits"))
    with pytest.raises(ValueError, match="stores the fields"):
        buf.update(stream(3))  # without the logits this buffer carries
    with pytest.raises(ValueError, match="one row per sample"):
        buf.update(stream(3), logits=torch.zeros(2, 3))


def test_extra_fields_through_class_balanced_selection_and_remove():
    buf = ClassBalancedBuffer(max_size=20, seed=0)
    s = stream(100, n_classes=4)
    buf.update(s, logits=s.y.float().unsqueeze(1))
    assert torch.equal(buf.get("logits").squeeze(1), buf.data["y"].float())
    buf.remove(buf.data["y"] != 0)
    assert len(buf) == 15 and torch.equal(buf.get("logits").squeeze(1), buf.data["y"].float())


# --------------------------------------------------------------------------- balanced draws


def test_group_balanced_draws_give_equal_shares_and_oversample_small_groups():
    buf = ReservoirBuffer(max_size=100, seed=0)
    y = torch.cat([torch.zeros(50), torch.ones(5), torch.full((1,), 2)]).long()
    x = torch.arange(56).to(torch.uint8).view(-1, 1, 1, 1)
    buf.update(Experience(0, x, y, torch.zeros_like(y), torch.zeros_like(y)))
    idx = buf.sample_index(30, balance="class")
    assert torch.bincount(buf.data["y"][idx]).tolist() == [10, 10, 10]
    assert len(set(idx[buf.data["y"][idx] == 0].tolist())) == 10  # no repeats where not needed
    # class 1 has 5 samples for 10 draws: each twice; class 2 has one: ten times
    assert torch.bincount(idx[buf.data["y"][idx] == 1] - 50).tolist() == [2] * 5
    counts = torch.bincount(buf.data["y"][buf.sample_index(31, balance="class")]).tolist()
    assert sorted(counts) == [10, 10, 11]
    by_exp = buf.sample_index(8, balance="experience")  # a single group: 8 distinct samples
    assert len(set(by_exp.tolist())) == 8
    with pytest.raises(ValueError, match="balance='colour'"):
        buf.sample_index(8, balance="colour")
