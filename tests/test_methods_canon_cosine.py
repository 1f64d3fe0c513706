"""LUCIR and PODNet: the parts with exact answers, checked against hand computations (cosine
logits, margin ranking, POD-spatial, POD-flat, the LSC's proxy aggregation, NCA), the head's
growth and resume, and both methods end to end on the debug config."""

import copy
import math

import pytest
import torch
from conftest import make_cfg
from torch import nn

import clrun
from clrun.checkpoint import model_file
from clrun.errors import ConfigError
from clrun.models import CosineClassifier, mlp
from clrun.models.cosine import use_cosine_head
from clrun.strategies.lucir import margin_ranking
from clrun.strategies.podnet import kmeans, nca, pod_flat, pod_spatial
from clrun.strategies.utils import FeatureTap, stage_modules


def test_lucir_cosine_logits_by_hand():
    head = CosineClassifier(2, 4)
    head.grow([2, 0], torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    with torch.no_grad():
        head.scale.fill_(2.0)  # σ
    out = head(torch.tensor([[3.0, 4.0]]))
    # cos((3,4), (1,0)) = 3/5; cos((3,4), (1,1)) = 7/(5√2); σ = 2; classes 1, 3: no unit
    assert out[0, 2].item() == pytest.approx(2 * 0.6)
    assert out[0, 0].item() == pytest.approx(2 * 7 / (5 * math.sqrt(2)))
    assert out[0, 1].item() == out[0, 3].item() == clrun.models.MASKED


def test_lucir_margin_ranking_by_hand():
    sims = torch.tensor([[0.9, 0.2, 0.8, 0.5], [0.1, 0.3, 0.6, 0.7], [0.4, 0.1, 0.9, 0.2]])
    units = torch.tensor([0, 1, 3])  # units 0, 1 old; sample 2 is of a new class
    # sample 0: 0.9 vs top-2 new (0.8, 0.5): 0.5-0.9+0.8 = 0.4, 0.5-0.9+0.5 = 0.1
    # sample 1: 0.3 vs (0.7, 0.6): 0.9, 0.8; mean of the 4 pairs = 0.55
    assert margin_ranking(sims, units, 2, 2, 0.5).item() == pytest.approx(0.55)
    assert margin_ranking(sims, units, 2, 1, 0.5).item() == pytest.approx((0.4 + 0.9) / 2)
    assert margin_ranking(sims, torch.tensor([2, 3, 3]), 2, 2, 0.5).item() == 0.0
    # a pair beyond the margin costs nothing
    assert margin_ranking(sims, units, 2, 2, 0.0).item() == pytest.approx((0.0 + 0.4 + 0.3) / 4)


def _pod_by_hand(a: list[list[float]], b: list[list[float]]) -> float:
    def pooled(m):
        sq = [[v * v for v in row] for row in m]
        rows = [sum(r) for r in sq]  # summed over the width: one value per row (C·H)
        cols = [sum(sq[i][j] for i in range(len(sq))) for j in range(len(sq[0]))]  # C·W
        v = rows + cols
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    pa, pb = pooled(a), pooled(b)
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(pa, pb, strict=True)))


def test_pod_spatial_by_hand():
    a, b = [[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]
    c, d = [[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 2.0]]
    # a² = [[1,4],[9,16]]: rows 5, 25; columns 10, 20 → (5, 25, 10, 20)/√1150; b: (1,1,1,1)/2
    pooled_a = [x / math.sqrt(1150) for x in (5, 25, 10, 20)]
    expected = math.sqrt(sum((x - 0.5) ** 2 for x in pooled_a))
    assert _pod_by_hand(a, b) == pytest.approx(expected)
    t = lambda m: torch.tensor(m).view(1, 1, 2, 2)  # noqa: E731
    assert pod_spatial([t(a)], [t(b)]).item() == pytest.approx(expected, rel=1e-6)
    # two stages: the mean over stages; two samples: the mean over the minibatch
    two = pod_spatial([t(a), t(c)], [t(b), t(d)]).item()
    assert two == pytest.approx((expected + _pod_by_hand(c, d)) / 2, rel=1e-6)
    batch = pod_spatial([torch.cat([t(a), t(c)])], [torch.cat([t(b), t(d)])]).item()
    assert batch == pytest.approx((expected + _pod_by_hand(c, d)) / 2, rel=1e-6)
    # a vector (an MLP's hidden layer) is a C × 1 × 1 map: pooled (v², v²), normalised
    v, w = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 1.0]])
    pv, pw = (
        torch.tensor([1.0, 4, 1, 4]) / math.sqrt(34),
        torch.tensor([4.0, 1, 4, 1]) / math.sqrt(34),
    )
    assert pod_spatial([v], [w]).item() == pytest.approx((pv - pw).norm().item(), rel=1e-6)
    assert pod_spatial([t(a)], [t(a)]).item() == 0.0


def test_pod_flat_by_hand():
    assert pod_flat(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])).item() == 1.0
    got = pod_flat(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), torch.tensor([[1.0, 1.0], [5.0, 0.0]]))
    assert got.item() == pytest.approx((1 - 1 / math.sqrt(2) + 0) / 2)


def test_lsc_aggregates_proxies_by_softmax_by_hand():
    head = CosineClassifier(2, 6, proxies=2)
    proxies = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -2.0]])
    head.grow([5, 3], proxies)  # class 5: proxies 0, 1; class 3: proxies 2, 3
    out = head(torch.tensor([[2.0, 0.0]]))
    e = math.e
    # class 5: cosines (1, 0), softmax weights (e, 1)/(e+1) → e/(e+1)
    assert out[0, 5].item() == pytest.approx(e / (e + 1))
    # class 3: cosines (−1, 0), weights (1/e, 1)/(1/e + 1) → −(1/e)/(1/e + 1) = −1/(1+e)
    assert out[0, 3].item() == pytest.approx(-1 / (1 + e))
    with torch.no_grad():
        head.scale.fill_(3.0)  # η scales the aggregated similarity
    assert head(torch.tensor([[2.0, 0.0]]))[0, 5].item() == pytest.approx(3 * e / (e + 1))
    assert head.similarities(torch.tensor([[2.0, 0.0]])).tolist()[0] == pytest.approx(
        [e / (e + 1), -1 / (1 + e)]
    )
    # PODNet's code: −‖ĥ − θ̂‖² = 2cos − 2; class 5: (0, −2), weights (1, e⁻²)/(1 + e⁻²)
    head.similarity = "neg_squared_distance"
    w = math.exp(-2)
    assert head.similarities(torch.tensor([[2.0, 0.0]]))[0, 0].item() == pytest.approx(
        -2 * w / (1 + w)
    )


def test_nca_by_hand():
    logits, y0, y2 = torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]), torch.tensor([2])
    # the hinged form: [log Σ_{c≠y} exp z_c − z_y]₊ with z_y = 2 − 0.5: log(e + 1) − 1.5 < 0 → 0
    assert nca(logits, y0, 0.5, "hinge").item() == 0.0
    assert nca(logits, y2, 0.0, "hinge").item() == pytest.approx(math.log(math.exp(2) + math.e))
    # the code's: the margin comes off every class and cancels; target highest (z = 2, 1, 0):
    # the cross-entropy log(1 + e^−1 + e^−2), whatever the margin
    expected = math.log(1 + math.exp(-1) + math.exp(-2))
    assert nca(logits, y0, 0.5).item() == pytest.approx(expected)
    assert nca(logits, y0, 0.0).item() == pytest.approx(expected)
    # target not highest: (max − z_y) + log(1 + Σ_{c≠y} exp(z_c − max)) = 2 + log(1 + 1 + e⁻¹)
    assert nca(logits, y2, 0.0).item() == pytest.approx(2 + math.log(2 + math.exp(-1)))


def test_nca_code_form_raises_the_scale_when_the_target_scores_highest():
    # ŷ = (−0.5, −1, −2), target 0 highest by less than the margin 0.6: the code's loss
    # log(1 + e^−0.5η + e^−1.5η) falls as η grows, whatever δ (a target-only margin would make
    # the first term e^(0.1η) and push η down)
    eta = torch.tensor(1.0, requires_grad=True)
    sims, y = torch.tensor([[-0.5, -1.0, -2.0]]), torch.tensor([0])
    (grad,) = torch.autograd.grad(nca(eta * sims, y, eta * 0.6), eta)
    assert grad.item() == pytest.approx(
        -(0.5 * math.exp(-0.5) + 1.5 * math.exp(-1.5)) / (1 + math.exp(-0.5) + math.exp(-1.5))
    )


def test_head_grows_fixes_old_classes_and_loads_into_a_fresh_model():
    torch.manual_seed(0)
    model = mlp((1, 4, 4), 10, head="incremental", hidden_sizes=[8])
    assert use_cosine_head(model, 3, "test", False, "neg_squared_distance")
    assert isinstance(model.backbone[-1], nn.Identity)  # the last ReLU is out
    model.head.grow([0, 1])
    model.head.grow([2, 3, 4], torch.randn(9, 8))
    assert model.head.n_old == 2 and model.head.classes.tolist() == [0, 1, 2, 3, 4]
    assert not model.head.old_weight.requires_grad and model.head.new_weight.requires_grad
    x = torch.randn(5, 1, 4, 4)
    state = model.state_dict()
    torch.save(state, buf := __import__("io").BytesIO())
    buf.seek(0)
    fresh = mlp((1, 4, 4), 10, head="single", hidden_sizes=[8])
    rng = torch.get_rng_state()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws nothing
    assert isinstance(fresh.head, CosineClassifier) and fresh.head.proxies == 3
    assert fresh.head.similarity == "neg_squared_distance"
    assert isinstance(fresh.backbone[-1], nn.Identity)  # taken out again before loading
    assert torch.equal(fresh(x), model(x))
    assert not fresh.head.old_weight.requires_grad and fresh.head.n_old == 2


def test_stages_of_the_backbones_and_a_refusal():
    net = mlp((1, 4, 4), 10, hidden_sizes=[8, 8, 8], dropout=0.1).backbone
    assert stage_modules(net, "x") == [net[2], net[5], net[8]]  # each hidden layer's ReLU
    assert len(stage_modules(clrun.models.cnn((1, 8, 8), 10).backbone, "x")) == 2
    assert len(stage_modules(clrun.models.resnet32((3, 8, 8), 10).backbone, "x")) == 3
    with pytest.raises(ConfigError, match="PODNet distils the outputs of the backbone's stages"):
        stage_modules(clrun.models.mobilenet_v1((3, 8, 8), 10).backbone, "PODNet")


def test_feature_tap_keeps_each_module_own_output_also_in_a_copy():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    tap = FeatureTap()
    tap.watch([net[1]])
    tap.watch([net[1]])  # idempotent: one hook
    assert len(net[1]._forward_hooks) == 1
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        teacher[0].weight.zero_()
        teacher[0].bias.fill_(1.0)
    x = torch.randn(3, 2)
    out, out_t = net(x), teacher(x)
    assert torch.equal(tap[net[1]], out) and torch.equal(tap[teacher[1]], out_t)
    assert torch.equal(tap[teacher[1]], torch.ones(3, 2))


def test_kmeans_finds_separated_clusters():
    a = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    b = torch.tensor([[10.0, 10.0], [10.0, 11.0]])
    c = kmeans(torch.cat([a, b]), 2, torch.Generator().manual_seed(0))
    got = sorted(c.tolist())
    assert got[0] == pytest.approx(a.mean(0).tolist()) and got[1] == pytest.approx(
        b.mean(0).tolist()
    )
    assert kmeans(a[:1], 3, torch.Generator()).shape == (3, 2)  # fewer samples than k


def test_lucir_keeps_old_class_weights_fixed_and_reloads(run_debug):
    summary, run_dir = run_debug("strategy=lucir", "checkpoint.keep=every_experience")
    assert summary["status"] == "completed"
    kept = [torch.load(model_file(run_dir, i), weights_only=True)["model"] for i in (3, 4)]
    before, after = ({k[5:]: v for k, v in m.items() if k.startswith("head.")} for m in kept)
    assert after["old_weight"].shape[0] == 8 and after["_extra_state"]["kind"] == "cosine"
    # trained on experience 4 (no class-balanced finetuning): the 8 old weights are untouched
    assert torch.equal(after["old_weight"], torch.cat([before["old_weight"], before["new_weight"]]))
    assert not torch.equal(after["scale"], before["scale"])  # σ trains
    # the parameter count grows by the new classes' weights only (2 classes × d features)
    d = after["old_weight"].shape[1]
    params = summary["params_per_experience"]
    assert [b - a for a, b in zip(params, params[1:], strict=False)] == [2 * d] * 4


def test_podnet_scale_stays_positive_and_every_experience_is_learnt(run_debug, tmp_path):
    # the collapse this guards against: a margin taken off the target only (nca_form=hinge, not
    # the code's form) lowers η on every sample that misses it, η crosses 0 and the LSC's logits
    # (and every prediction) invert; the accuracy matrix's diagonal then falls to ~0
    # noisy classes (pixel noise 200 of 255), so that the margin is often missed: with the
    # target-only margin η ends experience 0 at −3.6 and the diagonal starts at 0.51
    overrides = ("checkpoint.keep=every_experience", "benchmark.noise=200")
    summary, run_dir = run_debug("strategy=podnet", *overrides)
    assert summary["status"] == "completed"
    scales = [
        torch.load(model_file(run_dir, i), weights_only=True)["model"]["head.scale"].item()
        for i in range(5)
    ]
    assert min(scales) > 1.0, scales  # η starts at 1 and grows while the targets score highest
    rows = (run_dir / "acc_matrix.csv").read_text().splitlines()[1:]
    diag = [float(r.split(",")[i]) for i, r in enumerate(rows)]
    assert min(diag) > 0.6, diag  # each experience learnt right after training on it (0.70)


@pytest.mark.parametrize("strategy", ["lucir", "podnet"])
def test_the_papers_sgd_is_chosen_and_the_command_line_wins(strategy):
    # the strategy's YAML overrides the optimizer group (it comes after it in the defaults list)
    cfg = make_cfg(f"strategy={strategy}")
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.momentum) == (
        "torch.optim.SGD",
        0.1,
        0.9,
    )
    assert cfg.optimizer.weight_decay == 5e-4
    assert make_cfg(f"strategy={strategy}", "optimizer=adam").optimizer._target_ == (
        "torch.optim.Adam"
    )
    assert make_cfg(f"strategy={strategy}", "optimizer.lr=0.05").optimizer.lr == 0.05


@pytest.mark.parametrize("strategy", ["lucir", "podnet"])
def test_refuses_task_il_and_a_reservoir_buffer(run_debug, strategy):
    with pytest.raises(ConfigError, match="class-incremental only"):
        run_debug(f"strategy={strategy}", "benchmark.scenario=task")
    with pytest.raises(ConfigError, match="buffer=ReservoirBuffer is not supported"):
        run_debug(f"strategy={strategy}", "buffer=reservoir")
