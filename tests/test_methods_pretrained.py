"""The frozen-feature cache and the methods on a frozen embedding (SimpleCIL, NCM, RanPAC, FeCAM,
the linear probe): their exact properties against direct computations on all data at once,
scenarios, frozen backbones, and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_learned, make_cfg
from test_resume import _kill_anywhere_then_resume
from torch import nn

from clrun.benchmarks import concat, synthetic
from clrun.components import RunState
from clrun.config import build
from clrun.errors import ConfigError
from clrun.features import FeatureCache, frozen_features
from clrun.models import MASKED, mlp
from clrun.strategies import FeCAM, FreezeBackbone, RanPAC, SimpleCIL, TrainOnly
from clrun.strategies.fecam import fecam_precision, mahalanobis_logits
from clrun.strategies.ranpac import choose_ridge, ridge_losses, ridge_solve

METHODS = ("simplecil", "ncm", "ranpac", "fecam", "linear_probe")


def make_state(seed: int = 0, scenario: str = "class", **bench) -> RunState:
    torch.manual_seed(seed)
    benchmark = synthetic(scenario=scenario, train_per_class=30, test_per_class=5, **bench)
    model = mlp(benchmark.input_shape, benchmark.n_classes, hidden_sizes=[32, 16])
    return RunState(model, benchmark, torch.device("cpu"), batch_size=32)


def all_features(state: RunState):
    """Every training sample's embedding in one forward pass, with its label."""
    data = concat(state.benchmark.train_stream, 0)
    with torch.no_grad():
        f = state.model.backbone(state.model_input(data.x, data.e)).float()
    return f, data.y


# ---------------------------------------------------------------- the frozen-feature cache


def test_cache_computes_once_and_matches_the_backbone():
    state = make_state()
    exp = state.benchmark.train_stream[0]
    cache = FeatureCache(batch_size=1000)
    f = cache(state, exp)
    assert cache(state, exp) is f and cache.computed == 1  # reused, not recomputed
    with torch.no_grad():
        direct = state.model.backbone(state.model_input(exp.x, exp.e))
    assert torch.equal(f, direct) and f.dtype == torch.float32
    assert not f.is_inference()  # usable with autograd later
    assert state.model.training  # the model's mode is left as it was


def test_cache_is_invalidated_when_the_backbone_changes_and_only_then():
    state = make_state()
    exp = state.benchmark.train_stream[0]
    cache = FeatureCache()
    first = cache(state, exp)
    head_opt = torch.optim.SGD(state.model.head.parameters(), lr=0.1)
    state.model(state.model_input(exp.x, exp.e), exp.t).sum().backward()
    head_opt.step()  # the head changed: the embedding did not
    assert cache(state, exp) is first and cache.computed == 1
    torch.optim.SGD(state.model.backbone.parameters(), lr=0.1).step()  # in place: _version bumps
    second = cache(state, exp)
    assert cache.computed == 2 and not torch.equal(first, second)
    state.model.backbone.add_module("adapter", nn.Linear(16, 16))  # a module attached
    cache(state, exp)
    assert cache.computed == 3
    state.model.load_state_dict(state.model.state_dict())  # weights written again
    cache(state, exp)
    assert cache.computed == 4
    other = state.benchmark.train_stream[1]
    cache(state, other)
    assert cache.computed == 5 and cache(state, exp) is not None and cache.computed == 5


def test_run_shared_cache_lives_in_the_state_and_not_in_component_state():
    state = make_state()
    exp = state.benchmark.train_stream[0]
    f = frozen_features(state, exp)
    assert frozen_features(state, exp) is f and state.extras["feature_cache"].computed == 1
    c = SimpleCIL()
    c.post_update(state, exp)
    assert state.extras["feature_cache"].computed == 1  # the component reused it
    assert set(c.state_dict()) == {"sums", "counts"}


# ---------------------------------------------------------------- SimpleCIL and NCM


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_simplecil_equals_the_prototype_classifier_fit_on_all_data_in_any_order(metric):
    state = make_state()
    stream = state.benchmark.train_stream
    forward, backward = SimpleCIL(metric), SimpleCIL(metric)
    for exp in stream:
        forward.post_update(state, exp)
    for exp in reversed(stream):
        backward.post_update(state, exp)
    assert torch.equal(forward.prototypes(), backward.prototypes())
    f, y = all_features(state)
    means = torch.stack([f[y == c].mean(0) for c in range(state.benchmark.n_classes)])
    torch.testing.assert_close(forward.prototypes(), means)
    x = state.model_input(state.benchmark.test_stream[0].x, state.benchmark.test_stream[0].e)
    with torch.no_grad():
        logits = forward.predict(state, x, None)
        g = state.model.backbone(x)
    if metric == "cosine":  # PILOT's CosineLinear with σ = 1
        expected = nn.functional.normalize(g, dim=1) @ nn.functional.normalize(means, dim=1).T
    else:
        expected = -((g.unsqueeze(1) - means.unsqueeze(0)) ** 2).sum(2)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_simplecil_masks_unseen_classes_and_averages_recurring_ones():
    state = make_state(scenario="domain", n_experiences=2, n_classes=4)
    c = SimpleCIL()
    for exp in state.benchmark.train_stream:
        c.post_update(state, exp)
    f, y = all_features(state)
    for k in y.unique().tolist():
        torch.testing.assert_close(c.prototypes()[k], f[y == k].mean(0))
    fresh = make_state()
    s = SimpleCIL()
    s.post_update(fresh, fresh.benchmark.train_stream[0])
    x = fresh.model_input(fresh.benchmark.test_stream[0].x, fresh.benchmark.test_stream[0].e)
    with torch.no_grad():
        out = s.predict(fresh, x, None)
    unseen = [k for k in range(10) if k not in fresh.benchmark.train_stream[0].classes]
    assert (out[:, unseen] == MASKED).all()


# ---------------------------------------------------------------- RanPAC


@pytest.mark.parametrize("M", [0, 64])
def test_ranpac_ridge_weights_equal_a_direct_solve_on_all_data_in_any_order(M):  # noqa: N803
    state = make_state()
    stream = state.benchmark.train_stream
    forward, backward = RanPAC(M=M, seed=3), RanPAC(M=M, seed=3)
    for exp in stream:
        forward.post_update(state, exp)
    for exp in reversed(stream):
        backward.post_update(state, exp)
    torch.testing.assert_close(forward.G, backward.G, rtol=1e-12, atol=1e-9)
    f, y = all_features(state)
    h = forward.project(f).double()
    Y = nn.functional.one_hot(y, state.benchmark.n_classes).double()
    for ridge in (forward.ridge, 1e-2, 1e3):
        direct = torch.linalg.solve(h.T @ h + ridge * torch.eye(h.shape[1]).double(), h.T @ Y)
        torch.testing.assert_close(
            ridge_solve(forward.G, forward.C, ridge).double(), direct, rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            ridge_solve(backward.G, backward.C, ridge).double(), direct, rtol=1e-4, atol=1e-5
        )
    x = state.model_input(state.benchmark.test_stream[2].x, state.benchmark.test_stream[2].e)
    with torch.no_grad():
        logits = forward.predict(state, x, None)
        expected = forward.project(state.model.backbone(x)) @ forward.W_out
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("n,m", [(200, 12), (30, 80)], ids=["primal", "dual"])
def test_ranpac_ridge_choice_is_the_authors_80_20_search(n, m):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, m, generator=g, dtype=torch.float64).relu()
    y = nn.functional.one_hot(torch.randint(0, 4, (n,), generator=g), 4).double()
    ridges = [10.0**k for k in range(-8, 9)]
    # the authors' optimise_ridge_parameter, written out
    k = int(n * 0.8)
    losses = []
    for r in ridges:
        wo = torch.linalg.solve(h[:k].T @ h[:k] + r * torch.eye(m).double(), h[:k].T @ y[:k])
        losses.append(float(((h[k:] @ wo - y[k:]) ** 2).mean()))
    np.testing.assert_allclose(ridge_losses(h, y, ridges).numpy(), losses, rtol=1e-6)
    assert choose_ridge(h, y, ridges) == ridges[int(np.argmin(losses))]


def test_ranpac_projection_is_seeded_and_redrawn_identically_after_loading():
    state = make_state()
    a = RanPAC(M=32, seed=5)
    a.post_update(state, state.benchmark.train_stream[0])
    b = RanPAC(M=32, seed=5)
    b.load_state_dict(a.state_dict())
    f = torch.randn(4, 16)
    assert torch.equal(a.project(f), b.project(f)) and torch.equal(a.W_out, b.W_out)
    assert not torch.equal(RanPAC(M=32, seed=6).project(f), a.project(f))


# ---------------------------------------------------------------- FeCAM


def numpy_fecam(train: np.ndarray, labels: np.ndarray, test: np.ndarray, g1, g2, beta=None):
    """The authors' pipeline (FeCAM_vit_cifar100.py; Tukey as models/base.py) in numpy."""

    def phi(v):
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        if beta is not None:
            v = np.power(v, beta)
            v = v / np.linalg.norm(v, axis=1, keepdims=True)
        return v

    train, test = phi(train), phi(test)
    out = np.full((len(test), labels.max() + 1), MASKED)
    for c in np.unique(labels):
        x = train[labels == c]
        cov = np.cov(x.T)
        off = cov.copy()
        np.fill_diagonal(off, 0.0)
        mask = off != 0.0
        off_mean = (off * mask).sum() / mask.sum()
        eye = np.eye(cov.shape[0])
        cov = cov + g1 * np.mean(np.diagonal(cov)) * eye + g2 * off_mean * (1 - eye)
        sd = np.sqrt(np.diagonal(cov))
        cov = cov / np.outer(sd, sd)
        d = test - x.mean(0)
        out[:, c] = -np.diagonal(d @ np.linalg.pinv(cov) @ d.T)
    return out


@pytest.mark.parametrize("g1,g2,beta", [(1.0, 0.0, None), (10.0, 10.0, None), (1.0, 1.0, 0.5)])
def test_fecam_distances_equal_a_hand_computation_on_a_toy_set(g1, g2, beta):
    rng = np.random.default_rng(0)
    train = np.abs(rng.normal(size=(24, 5))) + rng.normal(size=(24, 5)) * (beta is None)
    labels = np.repeat([0, 1, 2], 8)
    test = np.abs(rng.normal(size=(6, 5)))
    c = FeCAM(tukey_beta=beta, gamma1=g1, gamma2=g2)
    f = c.embed(torch.tensor(train, dtype=torch.float32)).double()
    means, precisions = torch.zeros(3, 5), torch.zeros(3, 5, 5)
    for k in range(3):
        fk = f[torch.tensor(labels) == k]
        means[k] = fk.mean(0).float()
        precisions[k] = fecam_precision(torch.cov(fk.T), g1, g2, True).float()
    seen = torch.ones(3, dtype=torch.bool)
    out = mahalanobis_logits(
        c.embed(torch.tensor(test, dtype=torch.float32)), means, precisions, seen
    )
    expected = numpy_fecam(train, labels, test, g1, g2, beta)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_fecam_component_on_a_run_state_equals_the_hand_computation():
    state = make_state()
    c = FeCAM(tukey_beta=0.5, gamma1=1.0, gamma2=1.0)
    for exp in state.benchmark.train_stream:
        c.post_update(state, exp)
    f, y = all_features(state)
    test = state.benchmark.test_stream[1]
    x = state.model_input(test.x, test.e)
    with torch.no_grad():
        out = c.predict(state, x, None)
        g = state.model.backbone(x)
    expected = numpy_fecam(f.double().numpy(), y.numpy(), g.double().numpy(), 1.0, 1.0, 0.5)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-3, atol=1e-3)


def test_fecam_tukey_needs_nonnegative_embeddings():
    state = make_state()
    state.model.backbone.append(nn.Linear(16, 16))  # no ReLU after it: negative entries
    with pytest.raises(ConfigError, match="tukey_beta=0.5 needs nonnegative embeddings"):
        FeCAM(tukey_beta=0.5).post_update(state, state.benchmark.train_stream[0])


# ---------------------------------------------------------------- runs, scenarios, freezing


class BackboneWatch:
    """Test component: the backbone's weights and buffers at each experience's end."""

    seen: list[dict] = []

    def post_update(self, state, exp):
        snapshot = {k: v.clone() for k, v in state.model.backbone.state_dict().items()}
        BackboneWatch.seen.append(snapshot)


@pytest.mark.parametrize(
    "component",
    [SimpleCIL(), SimpleCIL(metric="euclidean"), RanPAC(M=50), FeCAM(tukey_beta=None)],
    ids=["simplecil", "ncm", "ranpac", "fecam"],
)
def test_evaluation_scores_cached_test_embeddings_once_per_run(component):
    """A classifier on a frozen backbone scores whole test experiences from the frozen-feature
    cache: the test embeddings are computed at the first evaluation only, and the results are
    those of scoring batch by batch through ``predict``."""
    from clrun.components import Components
    from clrun.run import evaluate

    state = make_state()
    for exp in state.benchmark.train_stream[:2]:
        component.post_update(state, exp)
    cache = state.extras["feature_cache"]
    trained = cache.computed
    first = evaluate(state, Components({"c": component}), 7)
    assert cache.computed == trained + len(state.benchmark.test_stream)
    assert evaluate(state, Components({"c": component}), 7) == first  # nothing recomputed
    assert cache.computed == trained + len(state.benchmark.test_stream)

    class BatchByBatch:  # the same classifier without predict_experience
        def predict(self, state, x, t):
            return component.predict(state, x, t)

    cache.clear()

    batched = evaluate(state, Components({"c": BatchByBatch()}), 7)
    assert cache.computed == trained + len(state.benchmark.test_stream)  # the cache unused
    for a, b in zip(first, batched, strict=True):
        assert a["acc"] == b["acc"] and a["task_acc"] == b["task_acc"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


WATCH = "+strategy.components.zwatch._target_=test_methods_pretrained.BackboneWatch"


@pytest.mark.parametrize(
    "overrides,changes_on_first",
    [
        (("strategy=simplecil",), False),
        (("strategy=ranpac", "strategy.M=100"), False),
        (("strategy=fecam",), False),
        (("strategy=linear_probe", "model.batch_norm=true", "model.dropout=0.2"), False),
        (("strategy=ranpac", "strategy.M=100", "strategy.first_session_training=true"), True),
    ],
    ids=["simplecil", "ranpac", "fecam", "linear_probe_bn", "ranpac_first_session"],
)
def test_frozen_backbone_is_bit_identical_before_and_after_training(
    run_debug, overrides, changes_on_first
):
    BackboneWatch.seen = []
    summary, run_dir = run_debug(*overrides, WATCH)
    assert summary["status"] == "completed"
    cfg = make_cfg("debug=default", *overrides)
    torch.manual_seed(cfg.seed)  # the runner's initial model: the same seed and construction
    benchmark = build(cfg.benchmark, "benchmark")
    shape = {"input_shape": benchmark.input_shape, "n_classes": benchmark.n_classes}
    before = build(cfg.model, "model", **shape).backbone.state_dict()
    first, *rest = BackboneWatch.seen
    assert first.keys() == before.keys()
    assert any(not torch.equal(before[k], first[k]) for k in first) == changes_on_first
    for later in rest:
        assert all(torch.equal(first[k], later[k]) for k in first)
    rows = (run_dir / "train.csv").read_text().splitlines()[1:]
    steps = [int(r.split(",")[1]) for r in rows]
    if overrides[0] != "strategy=linear_probe":  # the others train on experience 0 at most
        assert steps[1:] == [0, 0, 0, 0] and (steps[0] > 0) == changes_on_first


@pytest.mark.parametrize("strategy", METHODS)
@pytest.mark.parametrize(
    "scenario", [("benchmark.scenario=task", "model.head=multi"), ("model.head=incremental",)]
)
def test_methods_run_in_class_and_task_incremental(run_debug, strategy, scenario):
    light = ("strategy.M=100",) if strategy == "ranpac" else ()
    summary, run_dir = run_debug(f"strategy={strategy}", *light, *scenario)
    assert summary["status"] == "completed"
    assert_learned(run_dir)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ("strategy=fecam", "benchmark.scenario=domain"),
            "FeCAM .*benchmark.scenario=domain is not supported",
        ),
        (
            ("strategy=fecam", "benchmark.online=true"),
            "FeCAM .*benchmark.online=true is not supported",
        ),
        (
            ("strategy=ranpac", "benchmark.online=true"),
            "RanPAC .*benchmark.online=true is not supported",
        ),
    ],
    ids=["fecam_domain", "fecam_online", "ranpac_online"],
)
def test_unsupported_settings_are_refused_in_one_line(run_debug, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_debug(*overrides)


def test_simplecil_runs_in_domain_incremental_and_online(run_debug):
    for extra in ("benchmark.scenario=domain", "benchmark.online=true"):
        summary, run_dir = run_debug("strategy=simplecil", extra)
        assert summary["status"] == "completed" and summary["steps"] == 0
        assert_learned(run_dir)


def test_train_only_and_freeze_backbone_settings():
    with pytest.raises(ValueError, match="TrainOnly first=-1"):
        TrainOnly(-1)
    state = make_state()
    exp = state.benchmark.train_stream[1]
    assert len(TrainOnly(True).train_data(state, state.benchmark.train_stream[0])) > 0
    assert len(TrainOnly(True).train_data(state, exp)) == 0 and len(
        TrainOnly(2).train_data(state, exp)
    )
    FreezeBackbone().train_data(state, exp)
    assert not any(p.requires_grad for p in state.model.backbone.parameters())
    assert all(p.requires_grad for p in state.model.head.parameters())


@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=ranpac", "strategy.M=200", "strategy.first_session_training=true"),
        ("strategy=fecam", "strategy.first_session_training=true", "strategy.tukey_beta=0.5"),
    ],
    ids=["ranpac_first_session", "fecam_first_session"],
)
def test_sigkill_during_first_session_training_then_resume(run_debug, tmp_path, overrides):
    _kill_anywhere_then_resume(run_debug, tmp_path, *overrides)
