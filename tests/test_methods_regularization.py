"""SI, MAS, RWalk, GEM and A-GEM: end to end in every scenario, bit-identical resumption, and
exact checks of their parts (GEM's quadratic program, A-GEM's projection, the importances, the
state round trips); LwF's distillation targets and per-experience weights."""

import itertools
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_cfg, round_trip

from clrun import checkpoint, plots
from clrun.benchmarks import Experience, synthetic
from clrun.components import Components, RunState
from clrun.config import ConfigError
from clrun.models import adapt_model, mlp
from clrun.strategies import AGEM, GEM, MAS, SI, LwF, RWalk
from clrun.strategies.agem import agem_project
from clrun.strategies.gem import gem_project, nnls_gram

METHODS = ["si", "mas", "rwalk", "gem", "agem"]
SCENARIOS = [("class", "single"), ("class", "incremental"), ("task", "multi"), ("domain", "single")]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(autouse=True)
def _no_plots(monkeypatch):
    """The plots are tested elsewhere; drawing them would be half of every run here."""
    monkeypatch.setattr(plots, "plot_run", lambda *args, **kwargs: None)


@pytest.mark.parametrize("scenario,head", SCENARIOS)
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_in_every_scenario(run_debug, method, scenario, head):
    summary, run_dir = run_debug(
        f"strategy={method}", f"benchmark.scenario={scenario}", f"model.head={head}"
    )
    assert summary["status"] == "completed"
    R = np.loadtxt(run_dir / "acc_matrix.csv", delimiter=",", skiprows=1)
    assert R.shape == (5, 5) and np.diag(R).min() > 0.8, R  # each experience is learned
    if scenario == "task":
        assert summary["final_avg_acc"] > 0.9


@pytest.mark.parametrize(
    "strategy,parts", [("replay_ewc", ["replay", "ewc"]), ("replay_rwalk", ["replay", "rwalk"])]
)
def test_yaml_compositions(run_debug, strategy, parts):
    cfg = make_cfg(f"strategy={strategy}")
    assert list(cfg.strategy.components) == parts and cfg.buffer is not None
    summary, _ = run_debug(f"strategy={strategy}")
    assert summary["status"] == "completed" and summary["final_avg_acc"] > 0.8


class _Stop(Exception):
    pass


VARIANTS = {  # method → extra overrides
    **{m: () for m in METHODS},
    "lwf_plain": (),
    "lwf_seen": ("strategy.distill_units=seen",),
    "lwf_vandeven": ("strategy.distill_units=seen", "strategy.weighting=context"),
    "si_vandeven": ("strategy.si_gradient=total", "strategy.si_clip_importance=false"),
}


@pytest.mark.parametrize("method", list(VARIANTS))
def test_resume_inside_an_experience_is_bit_identical(run_debug, tmp_path, monkeypatch, method):
    overrides = (
        f"strategy={method.split('_')[0]}",
        *VARIANTS[method],
        "model.head=incremental",
        "checkpoint.every_n_steps=10",
    )
    _, full = run_debug(*overrides)
    save, steps = checkpoint.save, []

    def save_then_stop(run_dir, state):
        save(run_dir, state)
        steps.append(state["step"])
        if len(steps) == 9:  # saves at steps 10, 20, 26 (end of exp 0), 30, 40, 50, 52, 60, 70
            raise _Stop

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(_Stop):
        run_debug(*overrides, run_dir=tmp_path / "resumed")
    assert steps[-1] == 70  # inside experience 2, with two experiences of history
    monkeypatch.setattr(checkpoint, "save", save)
    summary, resumed = run_debug(*overrides, "resume=true", run_dir=tmp_path / "resumed")
    assert summary["status"] == "completed"
    for name in ("acc_matrix.csv", "metrics.jsonl"):
        assert (resumed / name).read_text() == (full / name).read_text(), name


def test_bad_hyperparameter_in_config_names_the_key(run_debug):
    with pytest.raises(ConfigError, match=r"xi=0.*strategy\.xi"):
        run_debug("strategy=si", "strategy.xi=0")


@pytest.mark.parametrize(
    "make,kwargs,message",
    [
        (SI, {"si_lambda": -1.0}, "si_lambda=-1.0"),
        (SI, {"xi": 0}, "xi=0"),
        (SI, {"clip_importance": "no"}, "clip_importance='no'"),
        (LwF, {"alpha": True}, "alpha=True"),
        (
            LwF,
            {"distill_units": "all"},
            "distill_units='all' is not allowed: expected one of old | seen",
        ),
        (
            LwF,
            {"weighting": "1/c"},
            "weighting='1/c' is not allowed: expected one of fixed | context",
        ),
        (MAS, {"mas_lambda": float("nan")}, "mas_lambda=nan"),
        (MAS, {"alpha": 1.5}, "alpha=1.5"),
        (MAS, {"importance_samples": 0}, "importance_samples=0"),
        (MAS, {"samples_per_gradient": 0}, "samples_per_gradient=0"),
        (RWalk, {"ewc_alpha": 0.0}, "ewc_alpha=0.0"),
        (RWalk, {"delta_t": 0}, "delta_t=0"),
        (RWalk, {"epsilon": -1.0}, "epsilon=-1.0"),
        (RWalk, {"path_score": "no"}, "path_score='no'"),
        (
            RWalk,
            {"score_update": "sum"},
            "score_update='sum' is not allowed: expected one of average | accumulate",
        ),
        (GEM, {"patterns_per_experience": 0}, "patterns_per_experience=0"),
        (GEM, {"memory_strength": -0.5}, "memory_strength=-0.5"),
        (AGEM, {"sample_size": True}, "sample_size=True"),
    ],
)
def test_bad_hyperparameters_are_rejected(make, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make(**kwargs)


# --------------------------------------------------------------------------- driving components


def _setup(scenario: str = "class", head: str = "single") -> RunState:
    torch.manual_seed(0)
    bench = synthetic(scenario=scenario, n_experiences=3, n_classes=6, train_per_class=40)
    model = mlp(bench.input_shape, bench.n_classes, head=head, hidden_sizes=[16])
    return RunState(model, bench, torch.device("cpu"), batch_size=16)


def _step(state: RunState, components: Components, batch: Experience) -> None:
    """One training step of the runner itself, on exactly this batch."""
    from omegaconf import OmegaConf

    from clrun.run import train_experience

    settings = OmegaConf.create({"batch_size": len(batch), "iterations": 1, "epochs": 1})
    train_experience(state, batch, components, torch.Generator(), settings, lambda where: None)


def _train(state: RunState, components: Components, exp: Experience, steps: int = 10, finish=True):
    state.experience = exp.index
    adapt_model(state.model, exp)
    trainable = [p for p in state.model.parameters() if p.requires_grad]
    state.optimizer = torch.optim.Adam(trainable, lr=0.01)
    gen = torch.Generator().manual_seed(exp.index)
    for _ in range(steps):
        _step(state, components, exp.subset(torch.randint(len(exp), (16,), generator=gen)))
    if finish:
        for hook in components["post_update"]:
            hook(state, exp)


# --------------------------------------------------------------------------- importances


@pytest.mark.parametrize("make", [SI, MAS, RWalk], ids=["si", "mas", "rwalk"])
def test_importance_is_non_negative_and_zero_without_gradient(make):
    state = _setup()
    state.model.unused = torch.nn.Parameter(torch.ones(3))  # a parameter the output ignores
    state.model.backbone[1].bias.requires_grad_(False)  # a frozen parameter
    component = make()
    components = Components({"c": component})
    for exp in state.benchmark.train_stream[:2]:
        _train(state, components, exp)
    importance = component.weights if isinstance(component, RWalk) else component.importance
    assert all(bool((v >= 0).all()) for v in importance.values())
    assert torch.equal(importance["unused"], torch.zeros(3))
    assert "backbone.1.bias" not in importance
    assert sum(float(v.sum()) for v in importance.values()) > 0


def test_mas_importance_per_group_of_samples_as_the_agem_authors():
    """samples_per_gradient=k: Ω = (1/n) Σ_groups |∂ Σ_group ‖f(x)‖² / ∂θ|, by hand with autograd;
    k = 1 is the per-sample importance, and no group's Ω exceeds it."""
    state = _setup()
    exp = state.benchmark.train_stream[0].subset(torch.arange(25))
    params = dict(state.model.named_parameters())
    state.model.eval()
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    per_sample = {n: torch.zeros_like(p) for n, p in params.items()}
    for lo, hi, into in [(i, min(i + 10, 25), expected) for i in range(0, 25, 10)] + [
        (i, i + 1, per_sample) for i in range(25)
    ]:
        b = exp.subset(torch.arange(lo, hi))
        out = state.model(state.model_input(b.x, b.e), b.t)
        for n, g in zip(
            params, torch.autograd.grad(out.pow(2).sum(), list(params.values())), strict=True
        ):
            into[n] += g.abs()
    state.model.train()
    grouped, single = MAS(alpha=0.0, samples_per_gradient=10), MAS(alpha=0.0)
    for component in (grouped, single):
        component.post_update(state, exp)
    assert state.model.training
    for n in params:
        assert torch.allclose(grouped.importance[n], expected[n] / 25, rtol=1e-5, atol=1e-8), n
        assert torch.allclose(single.importance[n], per_sample[n] / 25, rtol=1e-4, atol=1e-7), n
        assert bool((grouped.importance[n] <= single.importance[n] + 1e-6).all())


@pytest.mark.parametrize("update", ["average", "accumulate"])
def test_rwalk_score_update_after_an_experience(update):
    """S ← s after the first experience; then the paper's ½(S + s), or the authors' code's
    S + ½(S + s); the penalty weights are F̂ + Ŝ of that S."""
    state = _setup()
    component = RWalk(score_update=update)
    components = Components({"c": component})
    exp0, exp1 = state.benchmark.train_stream[:2]
    _train(state, components, exp0)
    first = {n: v.clone() for n, v in component.score.items()}
    _train(state, components, exp1, finish=False)  # 10 steps = Δt: the last window is closed
    assert component.window_steps == 0
    s = {n: v.clone() for n, v in component.exp_score.items()}
    component.post_update(state, exp1)
    for n, old in first.items():
        want = 0.5 * (old + s[n]) if update == "average" else old + 0.5 * (old + s[n])
        assert torch.allclose(component.score[n], want), n


def test_rwalk_without_path_score_is_ewcpp_the_normalised_running_fisher():
    """path_score=false: the penalty weights are the min-max normalised running Fisher alone (the
    EWC of the A-GEM authors' code), the same F as with the score; with it, F̂ + Ŝ."""
    runs = {}
    for path_score in (True, False):
        state = _setup()
        component = RWalk(path_score=path_score)
        _train(state, Components({"c": component}), state.benchmark.train_stream[0])
        runs[path_score] = component
    with_score, alone = runs[True], runs[False]
    lo = min(float(f.min()) for f in alone.fisher.values())
    hi = max(float(f.max()) for f in alone.fisher.values())
    assert set(alone.weights) == set(with_score.weights)
    for name, w in alone.weights.items():
        assert torch.equal(alone.fisher[name], with_score.fisher[name]), name  # the same F
        assert torch.allclose(w, (alone.fisher[name] - lo) / (hi - lo), atol=1e-6), name
        assert bool((with_score.weights[name] >= w - 1e-6).all())
    assert max(float(w.max()) for w in alone.weights.values()) == pytest.approx(1.0)
    assert any(not torch.allclose(with_score.weights[n], alone.weights[n]) for n in alone.weights)


@pytest.mark.parametrize("make", [SI, RWalk], ids=["si", "rwalk"])
def test_path_integral_uses_the_gradient_of_the_loss_without_the_own_penalty(make):
    """g is exactly the gradient of the rest of the loss (zero for an old task's head, whose only
    gradient is the penalty), and the optimiser still gets the penalty's gradient."""
    state = _setup("task", "multi")
    component = make()
    components = Components({"c": component})
    exp0, exp1 = state.benchmark.train_stream[:2]
    _train(state, components, exp0)
    state.experience = exp1.index
    adapt_model(state.model, exp1)
    with torch.no_grad():  # away from θ*, so that the penalty pulls
        for p in state.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = exp1.subset(torch.arange(16))
    x = state.model_input(batch.x, batch.e)
    out = state.model(x, batch.t)
    ce = F.cross_entropy(out, batch.y)
    named = dict(state.model.named_parameters())
    names, params = list(named), list(named.values())
    if isinstance(component, RWalk):
        weights, strength = component.weights, component.ewc_lambda
    else:
        weights, strength = component.importance, component.si_lambda
    penalty = strength * sum(
        (w * (named[n][tuple(slice(0, s) for s in w.shape)] - component.anchor[n]) ** 2).sum()
        for n, w in weights.items()
    )
    expected = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    pulls = torch.autograd.grad(penalty, params, allow_unused=True)
    term = component.penalty(state, batch, x, out)
    assert torch.allclose(term, penalty) and not term.requires_grad
    state.model.zero_grad(set_to_none=True)
    (ce + term).backward()
    component.after_backward(state)
    for name, p, g, pull in zip(names, params, expected, pulls, strict=True):
        g = torch.zeros_like(p) if g is None else g
        assert torch.equal(component._grad[name], g), name
        total = g if pull is None else g + pull
        assert torch.allclose(p.grad, total, rtol=1e-5, atol=1e-7), name
    head0 = [n for n in names if n.startswith("head.heads.0.")]
    assert head0 and all(torch.equal(component._grad[n], torch.zeros_like(named[n])) for n in head0)
    assert float(named[head0[0]].grad.abs().sum()) > 0  # the penalty pulls on the old head


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("maximize", [False, True])
def test_si_importance_is_the_path_integral_over_the_damped_distance(clip, maximize):
    """Plain SGD on one parameter: ω = Σ lr·g², Ω = ω / (Δ² + ξ), by hand. Steps up the
    gradient (``maximize``) make ω = −Σ lr·g² < 0: Ω is then 0 with ``clip_importance`` (Zenke
    et al.), and negative without (van de Ven et al.'s code)."""
    state = _setup()
    si = SI(xi=0.5, clip_importance=clip)
    components = Components({"si": si})
    exp = state.benchmark.train_stream[0]
    adapt_model(state.model, exp)
    state.optimizer = torch.optim.SGD(state.model.parameters(), lr=0.1, maximize=maximize)
    bias = state.model.head.linear.bias
    start, omega = bias.detach().clone(), torch.zeros_like(bias)
    for i in range(3):
        before = bias.detach().clone()
        _step(state, components, exp.subset(torch.arange(16 * i, 16 * i + 16)))
        omega += -bias.grad * (bias.detach() - before)
    si.post_update(state, exp)
    expected = omega / ((bias.detach() - start) ** 2 + 0.5)
    assert bool((expected < 0).all()) if maximize else bool((expected > 0).all())
    expected = expected.clamp(min=0) if clip else expected
    assert torch.allclose(si.importance["head.linear.bias"], expected, rtol=1e-6)


@pytest.mark.parametrize("make", [SI, MAS, RWalk], ids=["si", "mas", "rwalk"])
def test_state_dict_round_trip_gives_identical_penalties(make):
    state = _setup("class", "incremental")
    component = make()
    components = Components({"c": component})
    exp0, exp1 = state.benchmark.train_stream[:2]
    _train(state, components, exp0)
    _train(state, components, exp1, steps=7, finish=False)  # stop inside experience 1
    copy = make()
    copy.load_state_dict(round_trip(component))
    batch = exp1.subset(torch.arange(32))
    x = state.model_input(batch.x, batch.e)
    out = state.model(x, batch.t)
    assert torch.equal(component.penalty(state, batch, x, out), copy.penalty(state, batch, x, out))
    component.post_update(state, exp1)  # the rest of the experience's state round-tripped too
    copy.post_update(state, exp1)
    first, second = component.penalty(state, batch, x, out), copy.penalty(state, batch, x, out)
    assert first is not None and torch.equal(first, second)


# --------------------------------------------------------------------------- GEM


def _kkt_by_enumeration(Q: torch.Tensor, c: torch.Tensor) -> list[torch.Tensor]:
    """Every u ≥ 0 with −(Qu + c) ≤ 0 and = 0 on u's support: least squares on each support."""
    k, points = len(c), []
    scale = float(Q.diagonal().max()) + float(c.abs().max()) + 1e-300
    for r in range(k + 1):
        for support in itertools.combinations(range(k), r):
            u = torch.zeros(k, dtype=torch.float64)
            if support:
                s = list(support)
                sol = torch.linalg.lstsq(Q[s][:, s], -c[s].unsqueeze(1), driver="gelsd")
                u[s] = sol.solution[:, 0]
            w = -(Q @ u + c)
            if (u >= -1e-12 * scale).all() and (w <= 1e-9 * scale).all():
                points.append(u)
    return points


@pytest.mark.parametrize("seed", range(4))
def test_gem_qp_solution_is_the_exact_projection(seed):
    gen = torch.Generator().manual_seed(seed)
    for P, k in [(3, 1), (3, 5), (10, 4), (20, 7), (5, 8)]:
        G = torch.randn(k, P, generator=gen, dtype=torch.float64)
        if k > 2:
            G[-1] = 2 * G[0]  # linearly dependent memory gradients
        g = torch.randn(P, generator=gen, dtype=torch.float64)
        for margin in (0.0, 0.5):
            new = gem_project(g, G, margin)
            if bool((G @ g >= 0).all()):
                assert new is g  # no constraint violated: g unchanged
                continue
            target = g + margin * G.sum(0)
            scale = G.norm(dim=1) * target.norm()
            assert (G @ new >= -1e-9 * scale).all()  # every constraint holds
            # KKT of the projection of `target` onto {z: Gz ≥ 0}: new = target + Gᵀu, u ≥ 0,
            # u_i > 0 only where constraint i is active
            Q, c = G @ G.T, G @ target
            u = nnls_gram(Q, c, 1e-10 * scale)
            assert (u >= 0).all() and torch.allclose(new, target + G.T @ u, atol=1e-9)
            assert torch.allclose(u * (G @ new), torch.zeros(k, dtype=torch.float64), atol=1e-8)
            # the same point as every KKT point found by brute force (the projection is unique)
            points = _kkt_by_enumeration(Q, c)
            assert points
            for p in points:
                assert torch.allclose(new, target + G.T @ p, atol=1e-7)


def test_gem_projection_by_hand():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    g1 = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # ⟨g, g1⟩ = −2: violated
    g2 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # ⟨g, g2⟩ = 1: satisfied
    expected = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)  # drop the g1 component
    assert torch.equal(gem_project(g, g1[None]), expected)
    assert torch.allclose(gem_project(g, torch.stack([g1, g2])), expected)
    g3 = torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64)  # also violated now: ⟨g, g3⟩ = −1
    assert torch.allclose(gem_project(g, torch.stack([g1, g3])), torch.tensor([0, 0, 0.5]).double())
    # margin γ: the projection of g + γ g1 = (1, −1.5, 0.5), still violated → (1, 0, 0.5)
    assert torch.allclose(gem_project(g, g1[None], margin=0.5), expected)
    assert gem_project(g, g2[None], margin=0.5) is g


def test_gem_projection_in_float32_meets_the_constraints():
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(6, 5000, generator=gen)
    g = -G[:3].sum(0) + 0.1 * torch.randn(5000, generator=gen)
    new = gem_project(g, G, 0.5)
    assert new.dtype == torch.float32 and new is not g
    assert (G @ new >= -1e-5 * G.norm(dim=1) * new.norm()).all()


def test_gem_memory_keeps_the_last_samples_of_the_current_experience():
    state = _setup()
    exp0 = state.benchmark.train_stream[0]
    gem = GEM(patterns_per_experience=20)
    first, second = exp0.subset(torch.arange(15)), exp0.subset(torch.arange(15, 25))
    replayed = Experience(0, first.x, first.y, first.t, torch.full_like(first.e, 7))
    state.experience = 0
    for batch in (first, replayed, second):  # replayed samples (e ≠ 0) are not remembered
        gem.after_step(state, batch, None, None)
    memory = gem.memory[0]
    assert memory["x"].dtype == torch.uint8 and len(memory["y"]) == 20
    assert torch.equal(memory["x"], exp0.x[5:25]) and torch.equal(memory["e"], exp0.e[5:25])


# --------------------------------------------------------------------------- A-GEM


def test_agem_projection():
    g = torch.tensor([1.0, 2.0, -1.0])
    ref = torch.tensor([-1.0, 0.0, 1.0])  # ⟨g, ref⟩ = −2
    new = agem_project(g, ref)
    assert torch.equal(new, torch.tensor([0.0, 2.0, 0.0])) and float(new @ ref) == 0
    assert agem_project(g, torch.tensor([1.0, 0.0, 0.0])) is g  # compatible: unchanged
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        g, ref = torch.randn(2, 100, generator=gen)
        new = agem_project(g, ref)
        assert float(new @ ref) >= -1e-5 * float(new.norm() * ref.norm())
        if float(g @ ref) >= 0:
            assert new is g
        else:  # the smallest change: along ref only
            change = new - g
            assert torch.allclose(change, (change @ ref) / (ref @ ref) * ref, atol=1e-6)


def test_agem_memory_is_a_random_subset_of_each_experience():
    state = _setup()
    agem = AGEM(patterns_per_experience=30)
    for exp in state.benchmark.train_stream[:2]:
        agem.post_update(state, exp)
    for exp in state.benchmark.train_stream[:2]:
        memory = agem.memory[exp.index]
        assert memory["x"].dtype == torch.uint8 and len(memory["y"]) == 30
        assert set(memory["y"].tolist()) <= set(exp.classes)
        assert (memory["e"] == exp.index).all()


@pytest.mark.parametrize("make", [GEM, AGEM], ids=["gem", "agem"])
def test_memory_round_trip_gives_identical_projection(make):
    state = _setup()
    component = make(patterns_per_experience=20)
    components = Components({"c": component})
    exp0, exp1 = state.benchmark.train_stream[:2]
    _train(state, components, exp0)
    _train(state, components, exp1, steps=3, finish=False)
    copy = make(patterns_per_experience=20)
    copy.load_state_dict(round_trip(component))
    batch = exp1.subset(torch.arange(16))
    F.cross_entropy(state.model(state.model_input(batch.x, batch.e), batch.t), batch.y).backward()
    params = list(state.model.parameters())
    grads = [p.grad.clone() for p in params]
    projected = []
    for c in (component, copy):
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        c.after_backward(state)
        projected.append([p.grad.clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*projected, strict=True))


def test_si_total_gradient_variant_differs_from_the_papers_task_gradient(run_debug):
    """``si_gradient=total`` integrates the penalty's gradient too: from the second experience
    on the importances (and so the results) differ from the paper's task-gradient SI."""
    task, task_dir = run_debug(
        "strategy=si", "strategy.si_lambda=5", "checkpoint.every_n_steps=1000"
    )
    total, total_dir = run_debug(
        "strategy=si", "strategy.si_lambda=5", "strategy.si_gradient=total"
    )
    assert task["status"] == total["status"] == "completed"
    omega = [
        torch.load(d / "checkpoint" / "state.pt", weights_only=True)["components"]["si"][
            "importance"
        ]
        for d in (task_dir, total_dir)
    ]
    assert any(not torch.equal(omega[0][k], omega[1][k]) for k in omega[0])
    with pytest.raises(ValueError, match="gradient"):
        SI(gradient="both")


@pytest.mark.parametrize("head", ["single", "incremental", "multi"])
def test_linear_fast_path_equals_per_sample_vmap(head, monkeypatch):
    """The (δ²)ᵀ(a²) shortcut for Linear layers gives the per-sample sums vmap gives."""
    from clrun.strategies import utils

    state = _setup(scenario="task" if head == "multi" else "class", head=head)
    for exp in state.benchmark.train_stream[:2]:
        adapt_model(state.model, exp)
    samples = state.benchmark.train_stream[1]

    def nll(out, y):
        return F.cross_entropy(out, y, reduction="none")

    def norm(out, y):
        return out.pow(2).sum(1)

    for loss, reduce in ((nll, torch.square), (norm, torch.abs)):
        fast = utils.sum_per_sample_grads(state, samples, loss, reduce)
        monkeypatch.setattr(utils, "_all_linear", lambda m, p: False)
        slow = utils.sum_per_sample_grads(state, samples, loss, reduce)
        monkeypatch.undo()
        for k in slow:
            assert torch.allclose(fast[k], slow[k], rtol=1e-4, atol=1e-6), k


# --------------------------------------------------------------------------- LwF


def test_lwf_weights_per_experience():
    """fixed: CE + alpha·KL; context: (1/c)·CE + (1 − 1/c)·alpha·KL (van de Ven et al.)."""
    assert [LwF(alpha=4.0).weights(c) for c in (1, 2, 5)] == [(1.0, 4.0)] * 3
    context = LwF(alpha=4.0, weighting="context")
    assert [context.weights(c) for c in (1, 2, 4, 5)] == [
        (1.0, 0.0),
        (0.5, 2.0),
        (0.25, 3.0),
        (0.2, 3.2),
    ]


@pytest.mark.parametrize(
    "units,weighting,kl,loss_weight",
    [
        ("old", "fixed", 0.0, None),  # 2 old units, equal logits: p = p̃ = (½, ½)
        ("seen", "fixed", math.log(2), None),  # p over 4 seen units: ¼ each; p̃ (½, ½, 0, 0)
        ("seen", "context", (1 - 1 / 2) * 4 * math.log(2), 1 / 2),  # c = 2, alpha = 4
    ],
)
def test_lwf_distillation_targets_by_hand(units, weighting, kl, loss_weight):
    """Teacher and student with all-zero logits after experience 0 (2 classes), training
    experience 1 (2 other classes): the KL is 0 over the old units, log 2 over the seen ones (the
    teacher's zeros on the 2 new classes); with weighting=context LwF also gives the runner's loss,
    (1/c)·CE."""
    state = _setup("class", "incremental")
    lwf = LwF(
        alpha=4.0 if weighting == "context" else 1.0, distill_units=units, weighting=weighting
    )
    components = Components({"lwf": lwf})
    assert bool(components["loss"]) == (loss_weight is not None)
    exp0, exp1 = state.benchmark.train_stream[:2]
    adapt_model(state.model, exp0)
    with torch.no_grad():
        for p in state.model.head.parameters():
            p.zero_()
    lwf.post_update(state, exp0)  # the teacher: zero logits on classes 0, 1
    state.experience = exp1.index
    lwf.pre_update(state, exp1)
    adapt_model(state.model, exp1)
    with torch.no_grad():
        for p in state.model.head.parameters():
            p.zero_()
    batch = exp1.subset(torch.arange(8))
    x = state.model_input(batch.x, batch.e)
    out = state.model(x, batch.t)
    assert math.isclose(float(lwf.penalty(state, batch, x, out).detach()), kl, abs_tol=1e-6)
    if loss_weight is not None:  # CE over the 4 units grown so far: log 4
        loss = components["loss"][-1](state, batch, x, out)
        assert math.isclose(float(loss.detach()), loss_weight * math.log(4), rel_tol=1e-6)


def test_lwf_current_classes_survive_a_checkpoint():
    state = _setup("class", "incremental")
    lwf = LwF(distill_units="seen")
    exp0, exp1 = state.benchmark.train_stream[:2]
    adapt_model(state.model, exp0)
    lwf.post_update(state, exp0)
    lwf.pre_update(state, exp1)
    adapt_model(state.model, exp1)
    copy = LwF(distill_units="seen")
    copy.load_state_dict(round_trip(lwf))  # resumed inside experience 1: no pre_update
    assert copy.current_classes == exp1.classes and copy.old_classes == exp0.classes
    state.experience = 1
    batch = exp1.subset(torch.arange(8))
    x = state.model_input(batch.x, batch.e)
    out = state.model(x, batch.t)
    assert torch.equal(lwf.penalty(state, batch, x, out), copy.penalty(state, batch, x, out))


@pytest.mark.parametrize("scenario,head", [("domain", "single"), ("task", "multi")])
def test_lwf_seen_units_are_the_old_ones_outside_class_incremental(scenario, head):
    """Domain-IL (one label space) and task-IL (one head per task) have no new units in the
    distilled softmax: distill_units=seen gives exactly the penalty of old."""
    state = _setup(scenario, head)
    exp0, exp1 = state.benchmark.train_stream[:2]
    terms = []
    for units in ("old", "seen"):
        torch.manual_seed(1)
        state.model = mlp(
            state.benchmark.input_shape, state.benchmark.n_classes, head=head, hidden_sizes=[16]
        )
        lwf = LwF(distill_units=units)
        adapt_model(state.model, exp0)
        lwf.post_update(state, exp0)
        state.experience = 1
        lwf.pre_update(state, exp1)
        adapt_model(state.model, exp1)
        with torch.no_grad():
            for p in state.model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        batch = exp1.subset(torch.arange(8))
        x = state.model_input(batch.x, batch.e)
        terms.append(lwf.penalty(state, batch, x, state.model(x, batch.t)))
    assert float(terms[0].detach()) > 0 and torch.equal(terms[0], terms[1])


@pytest.mark.parametrize("scenario,head", [("class", "incremental"), ("task", "multi")])
def test_ewc_predicted_fisher_is_the_empirical_fisher_of_the_models_own_labels(scenario, head):
    """fisher=predicted (van de Ven & Tolias's code): the per-sample gradients use the model's most
    likely label, which is the empirical Fisher of the data relabelled that way."""
    from clrun.strategies import EWC

    state = _setup(scenario, head)
    exp = state.benchmark.train_stream[0]
    adapt_model(state.model, exp)
    predicted = EWC(fisher="predicted", fisher_samples=50)._fisher(state, exp)
    with torch.no_grad():
        y = state.model(state.model_input(exp.x, exp.e), exp.t).argmax(1)
    relabelled = Experience(exp.index, exp.x, y, exp.t, exp.e)
    assert not torch.equal(y, exp.y)  # the untrained model's labels are not the data's
    empirical = EWC(fisher="empirical", fisher_samples=50)._fisher(state, relabelled)
    for name, f in predicted.items():
        assert torch.allclose(f, empirical[name], atol=1e-7), name


def test_separate_ewc_penalty_has_the_value_and_gradients_of_its_per_experience_terms():
    """Separate EWC penalises with one merged quadratic: the same value and gradients as the sum
    of its per-experience terms, also for a head that grew between them, and after a term is
    forgotten or the state is reloaded."""
    from clrun.strategies import EWC
    from clrun.strategies.utils import quadratic

    state = _setup("class", "incremental")
    ewc = EWC(mode="separate", ewc_lambda=3.0, fisher_samples=40)
    components = Components({"ewc": ewc})
    for exp in state.benchmark.train_stream:
        _train(state, components, exp)
    head = [t["fisher"]["head.units.linear.weight"].shape[0] for t in ewc.terms]
    assert head == [2, 4, 6]  # the head grew between the terms
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def value_and_grads(penalty):
        state.model.zero_grad()
        value = penalty()
        value.backward()
        return value.detach(), [p.grad.clone() for p in state.model.parameters()]

    def by_terms():
        return 1.5 * sum(quadratic(state.model, t["fisher"], t["params"]) for t in ewc.terms)

    def check(component):
        merged, grads = value_and_grads(lambda: component.penalty(state, None, None, None))
        expected, expected_grads = value_and_grads(by_terms)
        assert float(expected) > 0 and torch.allclose(merged, expected, rtol=1e-5)
        for g, e in zip(grads, expected_grads, strict=True):
            assert torch.allclose(g, e, rtol=1e-4, atol=1e-6)

    check(ewc)
    saved = round_trip(ewc)
    ewc.forget(state, [1])
    assert [t["experiences"] for t in ewc.terms] == [[0], [2]]
    check(ewc)
    ewc.load_state_dict(saved)
    assert len(ewc.terms) == 3
    check(ewc)
