import copy
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import has_torchvision, make_cfg
from torch import nn
from torch.func import functional_call, grad, vmap

from clrun import models
from clrun.benchmarks import Experience
from clrun.components import adapt
from clrun.config import ConfigError, build
from clrun.models import MASKED, IncrementalClassifier, MultiHeadClassifier, adapt_model, cnn, mlp


def exp(classes: list[int], task: int = 0, n: int = 8, index: int = 0) -> Experience:
    y = torch.tensor(classes).repeat(n // len(classes))
    x = torch.randint(0, 255, (len(y), 1, 6, 6), dtype=torch.uint8)
    return Experience(index, x, y, torch.full_like(y, task), torch.full_like(y, index))


def train_step(model, e: Experience, lr: float = 0.5):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss = F.cross_entropy(model(e.x.float() / 255, e.t), e.y)
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.Adam(ps, lr=0.01),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    ],
    ids=["adam", "sgd_momentum"],
)
def test_a_grown_head_trains_exactly_as_a_full_head_whose_unseen_units_are_masked(make_optimizer):
    # The optimiser state of a grown head carries over, zero-padded: old units keep their moments,
    # new ones start where a head allocated in full would have them (masked: zero gradients).
    torch.manual_seed(0)
    e0, e1 = exp([0, 1], n=16), exp([2, 3], n=16, index=1)
    model = mlp((1, 6, 6), 10, head="incremental", hidden_sizes=[16])
    opt = adapt(model, e0, make_optimizer(model.parameters()), make_optimizer)
    start = copy.deepcopy(model)

    def steps(net, optimizer, e, masked=()):
        for _ in range(4):
            out = net(e.x.float() / 255, e.t).clone()
            out[:, list(masked)] = MASKED  # constant logits: zero gradients for those units
            optimizer.zero_grad()
            F.cross_entropy(out, e.y).backward()
            optimizer.step()

    steps(model, opt, e0)
    opt = adapt(model, e1, opt, make_optimizer)
    units = model.head.units.linear
    grown = units.weight[2:].detach().clone(), units.bias[2:].detach().clone()
    steps(model, opt, e1)

    full = start  # the same network with all four units from the start, units 2 and 3 masked
    old = full.head.units.linear
    full.head.units.linear = nn.Linear(16, 4)
    with torch.no_grad():
        full.head.units.linear.weight.copy_(torch.cat([old.weight, grown[0]]))
        full.head.units.linear.bias.copy_(torch.cat([old.bias, grown[1]]))
    full.head.units.classes = torch.arange(4)
    full_opt = make_optimizer(full.parameters())
    steps(full, full_opt, e0, masked=(2, 3))
    steps(full, full_opt, e1)
    for (name, p), q in zip(model.named_parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)
    # a reset gives a fresh optimiser, no state carried
    assert not adapt(model, exp([4], index=2), opt, make_optimizer, reset=True).state


def test_incremental_head_grows_keeps_old_weights_and_trains_new_ones():
    model = mlp((1, 6, 6), 10, head="incremental", hidden_sizes=[16])
    assert adapt_model(model, exp([0, 1]))
    head = model.head.units
    assert head.classes.tolist() == [0, 1]
    old_w = head.linear.weight.detach().clone()
    assert adapt_model(model, exp([2, 3], index=1))
    assert not adapt_model(model, exp([2, 3], index=1))  # nothing new: no growth
    assert head.classes.tolist() == [0, 1, 2, 3]
    assert torch.equal(head.linear.weight[:2], old_w)
    before = head.linear.weight.detach().clone()
    train_step(model, exp([2, 3], index=1))
    assert not torch.equal(head.linear.weight[2:], before[2:])  # the new units are trained
    out = model(torch.rand(4, 1, 6, 6))
    assert out.shape == (4, 10) and torch.all(out[:, 4:] == MASKED)


def test_multi_head_routes_each_sample_by_task_label():
    torch.manual_seed(0)
    model = mlp((1, 6, 6), 4, head="multi", hidden_sizes=[16])
    adapt_model(model, exp([0, 1], task=0))
    adapt_model(model, exp([2, 3], task=1, index=1))
    assert len(model.head.heads) == 2
    x = torch.rand(6, 1, 6, 6)
    t = torch.tensor([0, 1, 0, 1, 1, 0])
    out = model(x, t)
    feats = model.backbone(x)
    for i in range(6):
        expected = model.head.heads[int(t[i])](feats[i : i + 1], 4)[0]
        assert torch.allclose(out[i], expected)
    assert torch.all(out[t == 0][:, 2:] == MASKED) and torch.all(out[t == 1][:, :2] == MASKED)
    # a task without a head (a future task at evaluation) gets all-masked logits
    assert torch.all(model(x[:2], torch.tensor([5, 2])) == MASKED)


def test_multi_head_training_one_task_leaves_other_heads_untouched():
    model = mlp((1, 6, 6), 4, head="multi", hidden_sizes=[16])
    adapt_model(model, exp([0, 1], task=0))
    adapt_model(model, exp([2, 3], task=1, index=1))
    h0 = [p.detach().clone() for p in model.head.heads[0].parameters()]
    train_step(model, exp([2, 3], task=1, index=1))
    assert all(torch.equal(a, b) for a, b in zip(h0, model.head.heads[0].parameters(), strict=True))


def test_grown_models_load_into_fresh_ones():
    for head in ("incremental", "multi"):
        a = mlp((1, 6, 6), 10, head=head, hidden_sizes=[8])
        adapt_model(a, exp([0, 1], task=0))
        adapt_model(a, exp([4, 5], task=1, index=1))
        b = mlp((1, 6, 6), 10, head=head, hidden_sizes=[8])
        b.load_state_dict(a.state_dict())
        x, t = torch.rand(3, 1, 6, 6), torch.tensor([0, 1, 1])
        assert torch.equal(a(x, t), b(x, t))


def test_nested_dynamic_heads_are_adapted():
    inner = IncrementalClassifier(4, 5)
    wrapper = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(inner))
    assert adapt_model(wrapper, exp([1, 3]))
    assert inner.units.classes.tolist() == [1, 3]
    assert isinstance(MultiHeadClassifier(4, 5), torch.nn.Module)


def test_cnn_forward_backward_with_every_head():
    for head in ("single", "incremental", "multi"):
        model = cnn((1, 6, 6), 4, head=head, channels=[4, 8])
        e = exp([0, 1], task=0)
        adapt_model(model, e)
        train_step(model, e)
        assert model(torch.rand(2, 1, 6, 6), torch.zeros(2, dtype=torch.long)).shape == (2, 4)


# ---------------------------------------------------------------- CIFAR backbones, any module + head

IMAGE_MODELS = {  # small widths where the architecture allows: fast on a CPU
    "cnn": lambda shape, n, head: cnn(shape, n, head=head, channels=[4]),
    "resnet18_reduced": lambda shape, n, head: models.resnet18_reduced(shape, n, head=head, nf=4),
    "resnet18": models.resnet18,
    "resnet32": models.resnet32,
    "mobilenet_v1": lambda shape, n, head: models.mobilenet_v1(
        shape, n, head=head, width_multiplier=0.25
    ),
}


def two_tasks() -> Experience:
    y = torch.tensor([0, 1, 2, 3])
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    return Experience(0, x, y, torch.tensor([0, 0, 1, 1]), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("head", ["single", "incremental", "multi"])
@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
def test_image_models_forward_backward_with_every_head(name, head):
    torch.manual_seed(0)
    model = IMAGE_MODELS[name]((3, 8, 8), 4, head)
    adapt_model(model, two_tasks())
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert out.shape == (2, 4)
    F.cross_entropy(out, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.backbone.parameters())


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
def test_image_models_per_sample_grads_in_eval_mode(name):
    """EWC's Fisher: per-sample gradients through functional_call + vmap, BatchNorm in eval."""
    torch.manual_seed(0)
    model = IMAGE_MODELS[name]((3, 8, 8), 4, "multi")
    adapt_model(model, two_tasks())
    model.eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def nll(p, xi, yi, ti):
        o = functional_call(model, (p, buffers), (xi.unsqueeze(0), ti.unsqueeze(0)))
        return F.cross_entropy(o, yi.unsqueeze(0))

    x, y, t = torch.randn(2, 3, 8, 8), torch.tensor([0, 2]), torch.tensor([0, 1])
    grads = vmap(grad(nll), in_dims=(None, 0, 0, 0))(params, x, y, t)
    alone = grad(nll)(params, x[1], y[1], t[1])  # the gradient on that sample alone
    for k, p in params.items():
        assert grads[k].shape == (2, *p.shape)
        assert torch.allclose(grads[k][1], alone[k], atol=1e-5), k


def test_reference_architectures():
    count = lambda m: sum(p.numel() for p in m.backbone.parameters())  # noqa: E731
    gem = models.resnet18_reduced((3, 32, 32), 10)
    assert gem.head.linear.in_features == 160 and 1.0e6 < count(gem) < 1.1e6
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in gem.modules())
    assert gem.backbone.conv1.kernel_size == (3, 3) and gem.backbone.conv1.stride == (1, 1)
    r18 = models.resnet18((3, 32, 32), 10)
    assert r18.head.linear.in_features == 512 and 11.0e6 < count(r18) < 11.2e6
    r32 = models.resnet32((3, 32, 32), 100)
    assert r32.head.linear.in_features == 64 and [len(s) for s in r32.backbone.stages] == [5, 5, 5]
    assert 0.45e6 < count(r32) < 0.47e6
    mb = models.mobilenet_v1((3, 32, 32), 10)
    assert mb.head.linear.in_features == 1024 and 3.1e6 < count(mb) < 3.3e6
    # 32×32 inputs end on a 4×4 map in GEM's net: the global pool is its avg_pool2d(out, 4)
    feats = gem.backbone.stages(
        torch.relu(gem.backbone.bn1(gem.backbone.conv1(torch.rand(1, 3, 32, 32))))
    )
    assert feats.shape[-2:] == (4, 4)


def test_conv_models_reject_flat_inputs_and_mlp_takes_them():
    for name in ("cnn", "resnet18_reduced", "resnet32", "mobilenet_v1"):
        with pytest.raises(ValueError, match=rf"model={name} needs image inputs \(C, H, W\)"):
            getattr(models, name)((12,), 3)
    assert mlp((12,), 3, hidden_sizes=[5])(torch.rand(2, 12)).shape == (2, 3)


def test_with_head_replaces_a_nested_classifier_and_adapt_model_finds_it():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.Flatten(),
        torch.nn.Sequential(
            torch.nn.Linear(4 * 6 * 6, 8),
            torch.nn.ReLU(),
            torch.nn.Sequential(torch.nn.Linear(8, 4)),
        ),
    )
    hidden = net[2][0].weight.detach().clone()
    model = models.as_multitask(net)
    assert isinstance(net[2][2][0], torch.nn.Identity)  # the final Linear, two levels down
    assert isinstance(model.head, MultiHeadClassifier) and model.head.in_features == 8
    assert torch.equal(model.backbone[2][0].weight, hidden)  # the rest is kept
    wrapper = torch.nn.ModuleDict({"inner": torch.nn.ModuleList([model])})  # nested deeper still
    assert adapt_model(wrapper, two_tasks())
    assert len(model.head.heads) == 2
    out = model(torch.rand(3, 3, 8, 8), torch.tensor([0, 1, 1]))
    assert out.shape == (3, 4) and torch.all(out[0, 2:] == MASKED)
    inc = models.with_head(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5)), 9, head="incremental"
    )
    assert isinstance(inc.head, IncrementalClassifier) and inc.head.n_classes == 9
    named = models.with_head(
        torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2)),
        head="single",
        classifier="0",
    )
    assert isinstance(named.backbone[0], torch.nn.Identity) and named.head.linear.in_features == 3
    with pytest.raises(ValueError, match="has no nn.Linear classifier"):
        models.as_multitask(torch.nn.Conv2d(3, 3, 1))


def test_torchvision_model_without_torchvision(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if not installed
    with pytest.raises(
        ValueError, match=r"model=torchvision \(model.name=resnet50\) needs torchvision"
    ):
        models.torchvision_model((3, 32, 32), 10, name="resnet50")
    cfg = make_cfg("model=torchvision", "model.name=resnet50")
    with pytest.raises(ConfigError, match=r"pip install 'clrun\[vision\]'") as info:
        build(cfg.model, "model", input_shape=(3, 32, 32), n_classes=10)
    assert str(info.value).startswith("model=torchvision (model.name=resnet50)")
    # everything else still works
    assert build(make_cfg("model=resnet32").model, "model", input_shape=(3, 8, 8), n_classes=4)


@pytest.mark.skipif(not has_torchvision(), reason="needs an importable torchvision")
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_model_with_our_heads(name):
    for head in ("single", "multi"):
        model = models.torchvision_model((1, 32, 32), 4, head=head, name=name)
        adapt_model(model, two_tasks())
        assert model(torch.rand(2, 1, 32, 32), torch.tensor([0, 1])).shape == (2, 4)
    with pytest.raises(ValueError, match="resnet51"):
        models.torchvision_model((3, 32, 32), 4, name="resnet51")


def test_mlp_truncated_normal_init_as_the_agem_authors():
    """init=truncated_normal: weights within ±2·init_std with about that std, biases init_bias;
    the default keeps PyTorch's initialisation; bad values are rejected by name."""
    torch.manual_seed(0)
    model = mlp((1, 28, 28), 10, hidden_sizes=[256, 256], init="truncated_normal")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3
    for m in (m.requires_grad_(False) for m in linears):
        assert float(m.weight.abs().max()) <= 0.2
        assert 0.08 < float(m.weight.std()) < 0.095  # a normal of std 0.1 cut at ±2 std: ≈ 0.088
        assert torch.equal(m.bias, torch.full_like(m.bias, 0.1))
    torch.manual_seed(0)
    plain = mlp((1, 28, 28), 10, hidden_sizes=[256, 256])
    assert float(next(plain.parameters()).detach().abs().max()) <= 1 / 28  # PyTorch's U(±1/√fan_in)
    for kwargs, message in (
        ({"init": "xavier"}, "model.init='xavier'"),
        ({"init_std": 0.0}, "model.init_std=0.0"),
        ({"init_bias": float("nan")}, "model.init_bias=nan"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            mlp((1, 6, 6), 10, **kwargs)


def test_mlp_batch_norm_as_gdumbs():
    """batch_norm=true: every hidden layer is Linear without bias → BatchNorm1d → ReLU; the head
    keeps its bias; a non-boolean is rejected by name."""
    model = mlp((1, 28, 28), 10, hidden_sizes=[100, 100], batch_norm=True)
    kinds = [type(m).__name__ for m in model.backbone]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU"]
    assert all(m.bias is None for m in model.backbone if isinstance(m, torch.nn.Linear))
    assert model(torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)).shape == (4, 10)
    with pytest.raises(
        ValueError, match="model.batch_norm='yes' is not allowed: expected true or false"
    ):
        mlp((1, 6, 6), 10, batch_norm="yes")


def test_mlp_xavier_uniform_init_as_the_der_authors():
    """init=xavier_uniform: weights within ±√(6 / (fan_in + fan_out)) and spread over it
    (uniform: std = bound/√3), every bias 0."""
    torch.manual_seed(0)
    model = mlp((1, 28, 28), 10, hidden_sizes=[100, 100], init="xavier_uniform")
    linears = [m.requires_grad_(False) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(100, 784), (100, 100), (10, 100)]
    for m in linears:
        bound = math.sqrt(6 / sum(m.weight.shape))
        assert float(m.weight.abs().max()) <= bound
        assert abs(float(m.weight.std()) - bound / math.sqrt(3)) < 0.1 * bound
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
