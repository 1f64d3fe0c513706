"""Parameter-efficient modules on a timm ViT (clrun.models.peft) and the methods that use them
or train the backbone: APER, SLCA, EASE. Exact properties on a two-block ViT-Tiny."""

import copy
import functools
import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TIMM_TINY, VIT_QUICK, make_cfg, strategy_args, vit_state

from clrun.components import Components, RunState
from clrun.config import ConfigError, build, build_model
from clrun.features import frozen_features
from clrun.models import MASKED, peft
from clrun.schedules import StepDecay
from clrun.strategies import APER, EASE, SLCA
from clrun.strategies.aper import ADAPTERS
from clrun.strategies.ease import complement

timm = pytest.importorskip("timm")


def grow(state: RunState, exp) -> None:
    from clrun.models import adapt_model

    adapt_model(state.model, exp)


def train_steps(state: RunState, exp, loss_fn=None, steps: int = 3, lr: float = 0.05) -> None:
    """A few SGD steps on the trainable parameters, as the runner takes them."""
    params = [p for p in state.model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    state.model.train()
    for i in range(steps):
        batch = exp.subset(torch.arange(i * 32, (i + 1) * 32))
        x = state.model_input(batch.x, batch.e, train=True)
        out = state.model(x, batch.t)
        loss = loss_fn(state, batch, x, out) if loss_fn else F.cross_entropy(out, batch.y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def snapshot(module: torch.nn.Module, prefix: str = "") -> dict:
    """The tensors of the module's state dict under ``prefix`` (no extra state)."""
    return {
        k: v.clone()
        for k, v in module.state_dict().items()
        if k.startswith(prefix) and isinstance(v, torch.Tensor)
    }


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the attach point


def test_find_vit_refuses_other_models_in_one_line():
    cfg = make_cfg("debug=default")
    model = build_model(cfg, build(cfg.benchmark, "benchmark"), torch.device("cpu"))
    with pytest.raises(
        ConfigError, match=r"needs a timm Vision Transformer \(model=timm.*not Sequential"
    ) as e:
        peft.attach(model, "adapter")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown parameter-efficient kind 'no_such_kind'"):
        peft.attach(vit_state().model, "no_such_kind")


# options that fit the two-block test ViT (the prompt kinds' default blocks go up to 4)
TINY_OPTIONS = {
    "dualprompt": {"g_layers": [0], "e_layers": [1]},
    "coda_prompt": {"tasks": 2, "layers": [0, 1]},
}


@pytest.mark.parametrize("kind", list(peft.KINDS))
def test_attach_each_kind(kind):
    """The attachment is a registered submodule that changes the forward pass only while
    active; the ViT freezes (not for finetune); the state dict loads into a fresh model, a deep
    copy runs its own modules."""
    state = vit_state()
    model = state.model.eval()
    x = torch.randn(4, 3, 16, 16)
    before = model.backbone(x)
    vit_weights = snapshot(model, "backbone.net.")
    a = peft.attach(model, kind, "p", **TINY_OPTIONS.get(kind, {}))
    assert peft.attachments(model) == {"p": a} and a.trainable
    vit_trains = [p.requires_grad for p in model.backbone.parameters()]
    assert all(vit_trains) if kind == "finetune" else not any(vit_trains)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(torch.randn_like(p))
    after = model.backbone(x)
    assert torch.equal(after, before) == (kind == "finetune")  # finetune: no module
    with peft.only(model, ()):
        assert torch.equal(model.backbone(x), before)
    assert a.active and same(snapshot(model, "backbone.net."), vit_weights)
    # a checkpoint (weights_only) of the model loads into a freshly built one
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = vit_state().model.eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.backbone(x), after)
    assert [p.requires_grad for p in fresh.parameters()] == [
        p.requires_grad for p in model.parameters()
    ]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.peft["p"].parameters():
            p.zero_()
    assert torch.equal(model.backbone(x), after)


def test_adapter_and_prompt_shapes_and_defaults():
    model = vit_state().model
    d = model.backbone.feature_dim
    a = peft.attach(model, "adapter", "a")
    assert a.blocks[0].down.weight.shape == (64, d) and a.blocks[0].scale == 0.1
    assert a.blocks[0].up.weight.abs().sum() == 0  # starts as the identity
    deep = peft.attach(model, "vpt_deep", "d", tokens=3)
    assert deep.prompts.shape == (2, 3, d)  # one set per block
    assert peft.attach(model, "vpt_shallow", "s").prompts.shape == (1, 5, d)
    with pytest.raises(ValueError, match="already has an attachment called 'a'"):
        peft.attach(model, "adapter", "a")
    with pytest.raises(ConfigError, match="vpt_deep takes no option 'width'; its options: tokens"):
        peft.attach(model, "vpt_deep", "w", width=3)


# ------------------------------------------------------------------ APER


@pytest.mark.parametrize("kind", ADAPTERS)
def test_aper_adapts_on_the_first_experience_only_and_prototypes_are_class_means(kind):
    state = vit_state()
    stream = state.benchmark.train_stream
    pretrained = copy.deepcopy(state.model.backbone).eval()
    vit0 = snapshot(state.model, "backbone.net.")
    aper = APER(adapter=kind)
    assert len(aper.train_data(state, stream[0])) == len(stream[0])
    aper.pre_update(state, stream[0])
    grow(state, stream[0])
    start = snapshot(state.model, "peft.")
    train_steps(state, stream[0])
    aper.post_update(state, stream[0])
    adapted = snapshot(state.model, "peft.")
    if kind == "finetune":  # the ViT itself was trained; the kept copy is the pre-trained one
        assert not same(snapshot(state.model, "backbone.net."), vit0)
        assert same(snapshot(aper.pretrained, "net."), snapshot(pretrained, "net."))
    else:
        assert not same(adapted, start) and same(snapshot(state.model, "backbone.net."), vit0)
    trained_vit = snapshot(state.model, "backbone.net.")
    for exp in stream[1:3]:  # (the stream's 5 experiences are alike: 3 show it)
        assert len(aper.train_data(state, exp)) == 0  # no gradient step after the first
        aper.pre_update(state, exp)
        grow(state, exp)
        assert not any(p.requires_grad for p in state.model.backbone.parameters())
        assert not any(p.requires_grad for p in state.model.peft.parameters())
        aper.post_update(state, exp)
        assert same(snapshot(state.model, "peft."), adapted)
        assert same(snapshot(state.model, "backbone.net."), trained_vit)
    # prototypes: class means of [pre-trained ; adapted] embeddings, by hand
    model = state.model.eval()
    with torch.no_grad():
        for exp in stream[:3]:
            x = state.model_input(exp.x, exp.e)
            f = torch.cat([pretrained(x), model.backbone(x)], dim=1)
            for c in exp.classes:
                mean = aper.sums[c] / aper.counts[c]
                torch.testing.assert_close(mean, f[exp.y == c].mean(0), rtol=1e-5, atol=1e-5)
        test = state.benchmark.test_stream[0]
        x = state.model_input(test.x[:8], test.e[:8])
        logits = aper.predict(state, x, test.t[:8])
        f = torch.cat([pretrained(x), model.backbone(x)], dim=1)
        seen = aper.counts > 0
        protos = aper.sums[seen] / aper.counts[seen].unsqueeze(1)
        expected = F.normalize(f, dim=1) @ F.normalize(protos, dim=1).T
        torch.testing.assert_close(logits[:, seen], expected, rtol=1e-5, atol=1e-5)
        assert (logits[:, ~seen] == MASKED).all()


def test_aper_refuses_other_scenarios_and_models(run_debug):
    with pytest.raises(ConfigError, match="APER needs a timm Vision Transformer"):
        run_debug("strategy=aper")
    with pytest.raises(ConfigError, match="APER is class-incremental only"):
        run_debug("strategy=aper", *TIMM_TINY, "benchmark.scenario=task")
    with pytest.raises(ConfigError, match="APER adapter"):
        run_debug("strategy=aper", *TIMM_TINY, "strategy.adapter=lora")


@pytest.mark.parametrize("kind", ["ssf", "vpt_shallow", "vpt_deep", "finetune"])
def test_aper_runs_with_every_adapter(run_debug, kind):
    summary, _ = run_debug(*strategy_args("aper"), f"strategy.adapter={kind}", "strategy.epochs=1")
    assert summary["status"] == "completed" and summary["final_avg_acc"] > 0.4


@pytest.mark.slow
def test_aper_finetune_resumes_bit_identical_after_sigkill(run_debug, tmp_path):
    from test_resume import _kill_anywhere_then_resume

    args = (*strategy_args("aper"), "strategy.adapter=finetune")
    _kill_anywhere_then_resume(run_debug, tmp_path, *args)


# ------------------------------------------------------------------ RanPAC's Phase 1


@pytest.mark.parametrize("kind", ["adapter", "ssf"])
def test_ranpac_phase1_trains_its_module_on_the_first_experience_only(kind):
    from clrun.strategies import RanPAC, TrainOnly

    state = vit_state()
    stream = state.benchmark.train_stream
    vit0 = snapshot(state.model, "backbone.net.")
    ranpac, only_first = RanPAC(M=50, adapter=kind, train_first=True), TrainOnly(True)
    assert len(only_first.train_data(state, stream[0])) == len(stream[0])
    ranpac.pre_update(state, stream[0])
    grow(state, stream[0])
    start = snapshot(state.model, "peft.")
    assert set(peft.attachments(state.model)) == {"ranpac"} and start
    before = frozen_features(state, stream[0])
    train_steps(state, stream[0])
    # the feature cache sees the attached module change (a stale entry would be `before`)
    assert not torch.equal(frozen_features(state, stream[0]), before)
    ranpac.post_update(state, stream[0])
    adapted = snapshot(state.model, "peft.")
    assert not same(adapted, start)  # Phase 1 trained the module ...
    assert same(snapshot(state.model, "backbone.net."), vit0)  # ... and not the ViT
    for exp in stream[1:3]:
        assert len(only_first.train_data(state, exp)) == 0
        ranpac.pre_update(state, exp)
        grow(state, exp)
        assert not any(p.requires_grad for p in state.model.backbone.parameters())
        assert not any(p.requires_grad for p in state.model.peft.parameters())
        ranpac.post_update(state, exp)
        assert same(snapshot(state.model, "peft."), adapted)
    # Phase 2 fits on the adapted embedding: the Gram matrix of ReLU(f W) with f the ViT's
    # output through the module
    model = state.model.eval()
    with torch.no_grad():
        h = torch.cat(
            [ranpac.project(model.backbone(state.model_input(e.x, e.e))) for e in stream[:3]]
        )
    h = h.double()
    torch.testing.assert_close(ranpac.G, h.T @ h, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ranpac_phase1_runs_resumes_and_refuses_an_untrained_adapter(run_debug, tmp_path):
    from test_resume import _kill_anywhere_then_resume

    args = (*TIMM_TINY, *VIT_QUICK, "strategy=ranpac", "strategy.M=100")
    phase1 = (*args, "strategy.first_session_training=true", "strategy.adapter=ssf")
    _kill_anywhere_then_resume(run_debug, tmp_path, *phase1)
    with pytest.raises(ConfigError, match="set strategy.first_session_training=true"):
        run_debug(*args, "strategy.adapter=adapter")
    with pytest.raises(ConfigError, match="RanPAC strategy.adapter=ssf needs a timm Vision"):
        run_debug("strategy=ranpac", "strategy.first_session_training=true", "strategy.adapter=ssf")


# ------------------------------------------------------------------ SLCA


def test_slca_backbone_lr_is_a_hundredth_of_the_head_s():
    state = vit_state()
    components = Components({"slca": SLCA()})
    make = components.optimizer_factory(functools.partial(torch.optim.SGD, lr=0.1), state.model)
    opt = make(state.model.parameters())
    head, backbone = opt.param_groups
    assert head["lr"] == 0.1 and backbone["lr"] == pytest.approx(0.001)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in state.model.backbone.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in state.model.head.parameters()}
    StepDecay(milestones=[1], gamma=0.5).apply(opt, 1)  # a schedule keeps the ratio
    assert backbone["lr"] == pytest.approx(head["lr"] * 0.01)
    with pytest.raises(ConfigError, match=r"learning rate × 0.5 on backbone\.\*"):
        Components({"a": SLCA(), "b": SimpleNamespace(lr_scales={"backbone.": 0.5})})


def test_slca_statistics_and_alignment_touch_only_the_head():
    state = vit_state()
    stream = state.benchmark.train_stream
    slca = SLCA(ca_epochs=2, ca_samples=16)
    for exp in stream[:2]:
        slca.train_data(state, exp)
        grow(state, exp)
        train_steps(state, exp, slca.loss, steps=2)
        backbone = snapshot(state.model, "backbone.")
        head = snapshot(state.model, "head.")
        slca.post_update(state, exp)
        assert same(snapshot(state.model, "backbone."), backbone)
        assert same(snapshot(state.model, "head."), head) == (exp.index == 0)  # aligned after 1
        model = state.model.eval()
        with torch.no_grad():
            f = model.backbone(state.model_input(exp.x, exp.e)).double()
        for c in exp.classes:
            fc = f[exp.y == c]
            centred = fc - fc.mean(0)
            cov = centred.T @ centred / (len(fc) - 1) + 1e-4 * torch.eye(f.shape[1]).double()
            torch.testing.assert_close(slca.means[c], fc.mean(0).float(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(slca.covs[c], cov.float(), rtol=1e-4, atol=1e-5)
            assert slca.class_exp[c] == exp.index


def test_slca_logit_normalisation_by_hand():
    slca = SLCA(logit_norm=0.1)
    slca.class_exp = torch.tensor([0, 0, 1, -1])
    logits = torch.tensor([[3.0, 4.0, 1.0], [0.0, 1.0, 2.0]])
    seen = torch.tensor([0, 1, 2])
    norms = torch.tensor([[(5 + 1) / 2], [(1 + 2) / 2]])
    expected = logits / norms / 0.1
    torch.testing.assert_close(slca._aligned_logits(logits, seen), expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ EASE


def test_ease_old_adapters_frozen_features_grow_and_prototypes():
    state = vit_state()
    stream = state.benchmark.train_stream
    vit0 = snapshot(state.model, "backbone.net.")
    d = state.model.backbone.feature_dim
    ease = EASE()
    x = state.model_input(stream[0].x[:4], stream[0].e[:4])
    kept = {}
    for exp in stream[:3]:
        ease.train_data(state, exp)
        ease.pre_update(state, exp)
        grow(state, exp)
        train_steps(state, exp, ease.loss, steps=2, lr=0.5)
        ease.post_update(state, exp)
        kept[exp.index] = snapshot(state.model.peft[f"ease{exp.index}"])
        for j, weights in kept.items():  # every adapter as it was when its experience ended
            assert same(snapshot(state.model.peft[f"ease{j}"]), weights), j
        assert not any(p.requires_grad for p in state.model.peft.parameters())
        assert same(snapshot(state.model, "backbone.net."), vit0)
        state.model.eval()
        with torch.no_grad():
            assert ease.features(state, x).shape == (4, d * (exp.index + 1))
        assert ease.real[torch.tensor(exp.classes)].all()
    # prototypes computed from data: class means in each subspace
    exp = stream[2]
    with torch.no_grad():
        xs = state.model_input(exp.x, exp.e)
        for j in range(3):
            f = ease.subspace(state, f"ease{j}", xs)
            for c in exp.classes:
                torch.testing.assert_close(
                    ease.prototypes[c, j], f[exp.y == c].mean(0), rtol=1e-5, atol=1e-5
                )


def test_ease_complement_by_hand():
    """Three experiences of two classes each, two-dimensional subspaces: the complemented
    prototypes of old classes against the authors' double loop."""
    g = torch.Generator().manual_seed(0)
    class_exp = torch.tensor([0, 0, 1, 1, 2, 2, -1])
    protos = torch.randn(7, 3, 2, generator=g)
    real = (class_exp.unsqueeze(1) >= torch.arange(3)) & (class_exp >= 0).unsqueeze(1)
    out = complement(protos, real, class_exp)
    expected = protos.clone()
    for i in range(2):  # old experience i
        for dd in range(i + 1, 3):  # a later subspace
            old = [c for c in range(7) if class_exp[c] == i]
            src = [c for c in range(7) if class_exp[c] >= dd]
            sim = torch.zeros(len(old), len(src))
            for a, c in enumerate(old):
                for b, s in enumerate(src):
                    sim[a, b] = F.cosine_similarity(protos[c, i], protos[s, i], dim=0)
            sim = sim.softmax(1)
            for a, c in enumerate(old):
                expected[c, dd] = sum(sim[a, b] * protos[s, dd] for b, s in enumerate(src))
    torch.testing.assert_close(out, expected)
    assert torch.equal(out[real], protos[real])  # computed prototypes are kept


def test_ease_predict_weights_by_hand():
    """Score of class c = cos in its own subspace + alpha / k · cos in the others."""
    state = vit_state()
    ease = EASE(alpha=0.3)
    for exp in state.benchmark.train_stream[:2]:
        ease.train_data(state, exp)
        ease.pre_update(state, exp)
        grow(state, exp)
        ease.post_update(state, exp)
    test = state.benchmark.test_stream[1]
    x = state.model_input(test.x[:5], test.e[:5])
    state.model.eval()
    with torch.no_grad():
        logits = ease.predict(state, x, test.t[:5])
        cos = [
            F.normalize(ease.subspace(state, f"ease{j}", x), dim=1)
            @ F.normalize(ease.prototypes[:, j], dim=1).T
            for j in range(2)
        ]
    for c in range(state.benchmark.n_classes):
        k = int(ease.class_exp[c])
        if k < 0:
            assert (logits[:, c] == MASKED).all()
            continue
        expected = sum(cos[j][:, c] * (1.0 if j == k else 0.3 / 1) for j in range(2))
        torch.testing.assert_close(logits[:, c], expected, rtol=1e-5, atol=1e-6)
