"""The replay-family methods (DER, DER++, ER-ACE, X-DER, iCaRL, GDumb, DER+LwF) end to end in
every scenario they support (class-incremental with a single head runs for every strategy in
test_end_to_end), clear errors for those they do not, and their parts against exact answers."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_learned, make_cfg

from clrun.benchmarks import Experience, synthetic
from clrun.buffers import ReservoirBuffer
from clrun.components import RunState
from clrun.config import ConfigError
from clrun.models import MASKED, adapt_model, mlp
from clrun.strategies import DER, ERACE, XDER, GDumb, ICaRL, Replay
from clrun.strategies.der import masked_mse
from clrun.strategies.icarl import nearest_mean_logits
from clrun.strategies.xder import supcon

FAST = ("strategy.iterations=4",)
INCREMENTAL = ("benchmark.scenario=class", "model.head=incremental")
TASK_MULTI = ("benchmark.scenario=task", "model.head=multi")
TASK_SINGLE = ("benchmark.scenario=task", "model.head=single")
DOMAIN = ("benchmark.scenario=domain",)

SUPPORTED = [
    ("der", INCREMENTAL),
    ("der", TASK_MULTI),
    ("der", DOMAIN),
    ("derpp", TASK_MULTI),
    ("er_ace", INCREMENTAL),
    ("er_ace", TASK_MULTI),
    ("er_ace", DOMAIN),
    ("icarl", INCREMENTAL),
    ("gdumb", INCREMENTAL),
    ("gdumb", TASK_MULTI),
    ("gdumb", DOMAIN),
    ("xder", TASK_SINGLE),
    ("der_lwf", TASK_MULTI),
]
UNSUPPORTED = [
    ("icarl", TASK_MULTI, "iCaRL is class-incremental only: benchmark.scenario=task"),
    ("icarl", DOMAIN, "iCaRL is class-incremental only: benchmark.scenario=domain"),
    ("xder", INCREMENTAL, "X-DER needs model.head=single"),
    ("xder", TASK_MULTI, "X-DER needs model.head=single"),
    ("xder", DOMAIN, "X-DER supports benchmark.scenario=class or task, not domain"),
]


@pytest.mark.parametrize(
    "strategy,scenario", SUPPORTED, ids=lambda v: "-".join(v) if isinstance(v, tuple) else v
)
def test_method_runs_in_a_supported_scenario(run_debug, strategy, scenario):
    summary, run_dir = run_debug(f"strategy={strategy}", *scenario, *FAST)
    assert summary["status"] == "completed"
    assert_learned(run_dir, first=1)  # 4 steps learn the first experience, not every later one


@pytest.mark.parametrize(
    "strategy,scenario,message",
    UNSUPPORTED,
    ids=lambda v: "-".join(v) if isinstance(v, tuple) else None,
)
def test_unsupported_scenarios_are_refused_clearly(run_debug, strategy, scenario, message):
    with pytest.raises(ConfigError, match=message):
        run_debug(f"strategy={strategy}", *scenario, *FAST)


@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=replay", "buffer=herding"),
        ("strategy=der", "buffer=class_balanced", "buffer.selection=closest_to_center"),
        ("strategy=er_ace", "buffer=herding", "strategy.replay_balance=class"),
        ("strategy=replay", "strategy.replay_balance=experience"),
    ],
    ids=lambda v: " ".join(v),
)
def test_ranked_buffers_and_balanced_draws_work_with_replay_methods(run_debug, overrides):
    summary, _ = run_debug(*overrides, *FAST)
    assert summary["status"] == "completed"


def test_icarl_memory_must_hold_one_exemplar_per_class(run_debug):
    with pytest.raises(ConfigError, match=r"strategy\.memory_size=5 must be at least .* 10"):
        run_debug("strategy=icarl", "strategy.memory_size=5", *FAST)


def test_der_lwf_is_a_yaml_composition_with_both_weights():
    cfg = make_cfg("strategy=der_lwf", "strategy.der_alpha=0.7", "strategy.alpha=2")
    assert list(cfg.strategy.components) == ["der", "lwf"]
    assert cfg.strategy.components.der.alpha == 0.7 and cfg.strategy.components.lwf.alpha == 2
    assert cfg.strategy.components.der.beta == 0.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"alpha": -1}, "DER alpha=-1 is not allowed: expected a finite number ≥ 0"),
        ({"minibatch_size": 0}, "DER minibatch_size=0"),
        (
            {"balance": "colour"},
            r"DER balance='colour' is not allowed: expected one of none \| class \| task \| experience",
        ),
    ],
)
def test_der_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DER(ReservoirBuffer(10), **kwargs)


# --------------------------------------------------------------------------- unit tests


def make_state(head: str = "single", scenario: str = "class") -> RunState:
    torch.manual_seed(0)
    bench = synthetic(scenario=scenario, train_per_class=20, test_per_class=5)
    model = mlp(bench.input_shape, bench.n_classes, head=head, hidden_sizes=[16])
    state = RunState(model, bench, torch.device("cpu"), batch_size=8)
    state.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return state


def step(state: RunState, component, batch: Experience) -> torch.Tensor:
    """One training step with the hooks a component has, as the runner makes it."""
    if hasattr(component, "replay"):
        batch = component.replay(state, batch)
    x = state.model_input(batch.x, batch.e, train=True)
    out = state.model(x, batch.t)
    loss = (
        component.loss(state, batch, x, out)
        if hasattr(component, "loss")
        else F.cross_entropy(out, batch.y)
    )
    term = component.penalty(state, batch, x, out) if hasattr(component, "penalty") else None
    loss = loss + term if term is not None else loss
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    if hasattr(component, "after_step"):
        component.after_step(state, batch, x, out)
    return out


def test_der_stores_each_sample_with_the_logits_the_model_gave_it():
    state = make_state()
    der = DER(ReservoirBuffer(100), alpha=0.3)
    exp = state.benchmark.train_stream[0]
    first = exp.subset(torch.arange(8))
    out = step(state, der, first)
    assert der.buffer.get("logits").shape == (8, state.benchmark.n_classes)
    assert torch.equal(der.buffer.get("logits"), out.detach())  # the pre-step forward pass
    assert torch.equal(der.buffer.data["x"], first.x)  # raw samples
    second = exp.subset(torch.arange(8, 16))
    out2 = step(state, der, second)  # the penalty now replays: the buffer keeps only new samples
    assert len(der.buffer) == 16 and torch.equal(der.buffer.get("logits")[8:], out2.detach())


def test_der_with_a_growing_head_compares_only_units_that_existed():
    stored = torch.tensor([[1.0, 2.0, MASKED, MASKED]])
    now = torch.tensor([[2.0, 4.0, 7.0, -3.0]])
    assert masked_mse(now, stored).item() == pytest.approx((1 + 4) / 2)
    state = make_state(head="incremental")
    der = DER(ReservoirBuffer(100))
    exp = state.benchmark.train_stream[0]
    adapt_model(state.model, exp)
    out = step(state, der, exp.subset(torch.arange(8)))
    logits = der.buffer.get("logits")
    assert torch.equal(logits, out.detach())
    others = [c for c in range(10) if c not in exp.classes]
    assert (logits[:, exp.classes] != MASKED).all() and (logits[:, others] == MASKED).all()


def test_er_ace_incoming_loss_ignores_seen_classes_absent_from_the_minibatch():
    state = make_state()
    ace = ERACE(ReservoirBuffer(100))
    ace.seen = torch.zeros(10, dtype=torch.bool)
    ace.seen[:4] = True  # classes 0-3 seen earlier
    y = torch.tensor([2, 3, 2])
    batch = Experience(
        1,
        torch.zeros(3, 1, 8, 8, dtype=torch.uint8),
        y,
        torch.zeros(3, dtype=torch.long),
        torch.ones(3, dtype=torch.long),
    )
    ace._n_new = 3
    out = torch.randn(3, 10, requires_grad=True)
    loss = ace.loss(state, batch, None, out)
    allowed = [2, 3, 4, 5, 6, 7, 8, 9]  # present + never seen
    pos = torch.tensor([allowed.index(c) for c in y.tolist()])
    assert loss.item() == pytest.approx(F.cross_entropy(out[:, allowed], pos).item(), rel=1e-6)
    loss.backward()
    assert (out.grad[:, [0, 1]] == 0).all() and (out.grad[:, 2:] != 0).all()
    # replayed rows: the ordinary cross-entropy over all units, added as its own mean
    ace.seen[:] = False
    ace.seen[:4] = True
    full = Experience(
        1,
        torch.zeros(5, 1, 8, 8, dtype=torch.uint8),
        torch.tensor([2, 3, 2, 0, 1]),
        torch.zeros(5, dtype=torch.long),
        torch.ones(5, dtype=torch.long),
    )
    out5 = torch.randn(5, 10)
    expected = F.cross_entropy(out5[:3, allowed], pos) + F.cross_entropy(out5[3:], full.y[3:])
    assert ace.loss(state, full, None, out5).item() == pytest.approx(expected.item(), rel=1e-6)


def test_er_ace_replays_after_the_incoming_samples_and_stores_only_them():
    state = make_state()
    ace = ERACE(ReservoirBuffer(100), batch_size=5)
    exp = state.benchmark.train_stream[0]
    step(state, ace, exp.subset(torch.arange(8)))
    assert len(ace.buffer) == 8
    batch = ace.replay(state, exp.subset(torch.arange(8, 16)))
    assert len(batch) == 13 and ace._n_new == 8
    ace.after_step(state, batch, None, None)
    assert len(ace.buffer) == 16  # the 5 replayed samples were not stored again


def test_replay_draws_group_balanced_minibatches():
    state = make_state()
    buf = ReservoirBuffer(200)
    exp = state.benchmark.train_stream[0]
    first, second = (torch.nonzero(exp.y == c).squeeze(1) for c in exp.classes)
    buf.update(exp.subset(torch.cat([first, second[:3]])))  # 20 of one class, 3 of the other
    replay = Replay(buf, batch_size=12, balance="class")
    batch = replay.replay(state, exp.subset(torch.arange(4)))
    assert torch.bincount(batch.y[4:], minlength=10)[exp.classes].tolist() == [6, 6]


def test_replay_context_weighting_weighs_new_and_replayed_losses_by_the_context():
    state = make_state()
    exp0, exp1, exp2 = state.benchmark.train_stream[:3]
    assert not hasattr(Replay(ReservoirBuffer(50)), "loss")  # batch weighting: the runner's CE
    replay = Replay(ReservoirBuffer(50), batch_size=6, weighting="context")
    new = exp0.subset(torch.arange(4))
    batch = replay.replay(state, new)  # empty buffer: nothing replayed
    out = torch.randn(len(batch), state.benchmark.n_classes)
    assert torch.equal(replay.loss(state, batch, None, out), F.cross_entropy(out, batch.y))
    replay.post_update(state, exp0)
    replay.post_update(state, exp1)
    for experience, c in ((exp1, 2), (exp2, 3)):
        state.experience = experience.index
        batch = replay.replay(state, experience.subset(torch.arange(4)))
        assert len(batch) == 10
        out = torch.randn(len(batch), state.benchmark.n_classes)
        want = F.cross_entropy(out[:4], batch.y[:4]) / c
        want = want + (1 - 1 / c) * F.cross_entropy(out[4:], batch.y[4:])
        torch.testing.assert_close(replay.loss(state, batch, None, out), want)
    with pytest.raises(
        ValueError, match=r"weighting='per_sample' is not allowed: expected one of batch \| context"
    ):
        Replay(ReservoirBuffer(5), weighting="per_sample")


def test_replay_step_update_stores_each_new_minibatch_after_its_step():
    """buffer_update=step: after_step offers the incoming samples (not the replayed ones) at
    once, so the experience replays itself from its second step; post_update adds nothing."""
    state = make_state()
    exp = state.benchmark.train_stream[0]
    replay = Replay(ReservoirBuffer(100), batch_size=3, buffer_update="step")
    first = replay.replay(state, exp.subset(torch.arange(4)))
    assert len(first) == 4  # nothing stored yet
    replay.after_step(state, first, None, None)
    assert len(replay.buffer) == 4
    second = replay.replay(state, exp.subset(torch.arange(4, 8)))
    assert len(second) == 7  # 4 new + 3 of the first minibatch, already replayed
    replay.after_step(state, second, None, None)
    assert len(replay.buffer) == 8  # the 3 replayed samples were not stored again
    stored = replay.buffer.samples()
    assert torch.equal(stored.x, exp.x[:8])
    replay.post_update(state, exp)
    assert len(replay.buffer) == 8
    per_experience = Replay(ReservoirBuffer(100))
    per_experience.after_step(state, first, None, None)
    assert len(per_experience.buffer) == 0
    per_experience.post_update(state, exp)
    assert len(per_experience.buffer) == min(100, len(exp))
    with pytest.raises(
        ValueError,
        match=r"buffer_update='epoch' is not allowed: expected one of experience \| step",
    ):
        Replay(ReservoirBuffer(5), buffer_update="epoch")


def test_icarl_nearest_mean_of_exemplars_is_the_nearest_class_mean():
    means = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]]), dim=1)
    has_mean = torch.tensor([True, True, True, False])
    f = torch.tensor([[2.0, 0.1], [0.2, 3.0], [-1.0, -0.5], [0.1, -1.0]])
    logits = nearest_mean_logits(f, means, has_mean)
    # (0.1, -1.0) normalised is nearer to (1, 0) than to (-1, 0) or (0, 1); class 3 has no mean
    assert logits.argmax(1).tolist() == [0, 1, 2, 0]
    assert torch.equal(logits.argmax(1), torch.cdist(F.normalize(f, dim=1), means[:3]).argmin(1))
    assert (logits[:, 3] == MASKED).all()


def test_icarl_class_means_come_from_herded_exemplars_and_drive_predict():
    state = make_state()
    icarl = ICaRL(memory_size=20)
    exp = state.benchmark.train_stream[0]
    data = icarl.train_data(state, exp)
    assert len(data) == len(exp)  # no exemplars yet
    icarl.post_update(state, exp)
    assert torch.bincount(icarl.memory.data["y"], minlength=2)[exp.classes].tolist() == [10, 10]
    assert icarl.has_mean[exp.classes].all() and icarl.has_mean.sum() == 2
    x = state.model_input(exp.x, exp.e)
    with torch.no_grad():
        f = F.normalize(state.model.backbone(x), dim=1)
        pred = icarl.predict(state, x, exp.t).argmax(1)
    means = icarl.class_means[exp.classes]
    assert torch.equal(pred, torch.tensor(exp.classes)[torch.cdist(f, means).argmin(1)])
    second = state.benchmark.train_stream[1]
    assert len(icarl.train_data(state, second)) == len(second) + 20  # experience ∪ exemplars
    icarl.post_update(state, second)
    seen = exp.classes + second.classes
    assert torch.bincount(icarl.memory.data["y"], minlength=10)[seen].tolist() == [5, 5, 5, 5]


def test_icarl_loss_distils_old_classes_with_sigmoid_targets():
    state = make_state()
    icarl = ICaRL(memory_size=20)
    exp0, exp1 = state.benchmark.train_stream[:2]
    icarl.train_data(state, exp0)
    icarl.post_update(state, exp0)  # teacher = current model, old classes = exp0's
    icarl.train_data(state, exp1)
    batch = exp1.subset(torch.arange(4))
    x = state.model_input(batch.x, batch.e)
    out = torch.randn(4, 10)
    with torch.no_grad():
        old = torch.sigmoid(state.model(x, batch.t))
    units = exp0.classes + exp1.classes
    target = torch.zeros(4, 4)
    target[:, :2] = old[:, exp0.classes]
    target[torch.arange(4), [units.index(c) for c in batch.y.tolist()]] = 1.0
    expected = F.binary_cross_entropy_with_logits(out[:, units], target)
    assert icarl.loss(state, batch, x, out).item() == pytest.approx(expected.item(), rel=1e-6)


def test_gdumb_memory_is_class_balanced_and_training_restarts_from_the_initial_weights():
    state = make_state()
    gdumb = GDumb(memory_size=30)
    exp0 = state.benchmark.train_stream[0]
    order = [c for e in state.benchmark.train_stream for c in e.classes]  # classes by experience

    def counts() -> list[int]:
        return torch.bincount(gdumb.memory.data["y"], minlength=10)[order].tolist()

    data = gdumb.train_data(state, exp0)
    assert counts()[:2] == [15, 15] and len(data) == 30
    gdumb.train_data(state, exp0)  # again (a resumed experience): the memory is not re-sampled
    assert counts()[:2] == [15, 15]
    initial = {k: v.clone() for k, v in state.model.state_dict().items()}
    gdumb.pre_update(state, exp0)
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(1.0)
    for exp in state.benchmark.train_stream[1:3]:
        gdumb.train_data(state, exp)
    assert counts()[:6] == [5, 5, 5, 5, 5, 5]
    gdumb.pre_update(state, state.benchmark.train_stream[2])
    assert state.reset_optimizer
    for k, v in state.model.state_dict().items():
        assert torch.equal(v, initial[k]), k


def test_gdumb_greedy_sampler_on_an_imbalanced_stream():
    state = make_state()
    gdumb = GDumb(memory_size=12)
    exp = state.benchmark.train_stream[0]
    major, minor = (torch.nonzero(exp.y == c).squeeze(1) for c in exp.classes)
    gdumb.train_data(state, exp.subset(torch.cat([major, minor[:4]])))  # 20 and 4 samples
    counts = torch.bincount(gdumb.memory.data["y"], minlength=10)[exp.classes].tolist()
    # the minority class keeps all it has; the majority is capped at 12 / 2 classes once both
    # have been seen, and never evicted below it (the paper's rule: no eviction while not full)
    assert counts[1] == 4 and 6 <= counts[0] <= 8
    gdumb.train_data(state, state.benchmark.train_stream[1])
    later = state.benchmark.train_stream[1].classes
    counts = torch.bincount(gdumb.memory.data["y"], minlength=10)[exp.classes + later].tolist()
    assert counts == [3, 3, 3, 3]


def test_gdumb_reset_reinitialises_units_a_growing_head_added():
    state = make_state(head="incremental")
    gdumb = GDumb(memory_size=30)
    exp = state.benchmark.train_stream[0]
    gdumb.train_data(state, exp)
    gdumb.pre_update(state, exp)
    adapt_model(state.model, exp)
    head = state.model.head.units.linear
    with torch.no_grad():
        head.weight.fill_(5.0)
    gdumb.pre_update(state, exp)
    assert head.weight.shape[0] == 2 and (head.weight.abs() < 5.0).all()


def test_xder_logit_update_rescales_to_gamma_times_the_ground_truth():
    xder = XDER(memory_size=10, gamma=0.5)
    old = torch.tensor([[4.0, 1.0, 0.0, 0.0], [4.0, 1.0, 0.0, 0.0]])
    new = torch.tensor([[9.0, 9.0, 8.0, 2.0], [9.0, 9.0, 3.0, 1.0]])
    units = torch.tensor([False, False, True, True])  # present and future heads
    out = xder._update_logits(old, new, torch.tensor([0, 0]), units)
    # row 0: max 8 > gt 4 → scaled by 0.5 · 4 / 8; row 1: max 3 < 4 → copied as they are
    assert torch.equal(out, torch.tensor([[4.0, 1.0, 2.0, 0.5], [4.0, 1.0, 3.0, 1.0]]))


def test_supcon_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(3, 2, 4, generator=g), dim=2)
    labels = torch.tensor([0, 1, 0])
    z = torch.cat([f[:, 0], f[:, 1]])  # anchors: view-major
    lab = labels.repeat(2)
    total = 0.0
    for i in range(6):
        others = [j for j in range(6) if j != i]
        denom = sum(math.exp(float(z[i] @ z[j]) / 5.0) for j in others)
        pos = [j for j in others if lab[j] == lab[i]]
        total += -sum(float(z[i] @ z[j]) / 5.0 - math.log(denom) for j in pos) / len(pos)
    assert supcon(f, labels, 5.0).item() == pytest.approx(total / 2, rel=1e-5)


def test_xder_fills_its_memory_class_balanced_and_rewrites_past_logits():
    state = make_state()
    xder = XDER(memory_size=12, gamma=0.85)
    exp0, exp1 = state.benchmark.train_stream[:2]
    xder.post_update(state, exp0)
    y0 = xder.memory.data["y"].tolist()
    assert sorted(y0.count(c) for c in exp0.classes) == [6, 6]
    before = xder.memory.get("logits").clone()
    with torch.no_grad():  # the model learns something new before the next memory update
        state.model.head.linear.weight.add_(torch.randn_like(state.model.head.linear.weight))
    xder.post_update(state, exp1)
    y = xder.memory.data["y"]
    assert torch.bincount(y, minlength=10)[exp0.classes + exp1.classes].tolist() == [3, 3, 3, 3]
    # old classes kept their first three samples, in order; their past head's logits untouched
    kept = [i for i, c in enumerate(y0) if y0[:i].count(c) < 3]
    past = xder.memory.get("logits")[:6]
    assert torch.equal(xder.memory.data["y"][:6], torch.tensor(y0)[kept])
    assert torch.equal(past[:, exp0.classes], before[kept][:, exp0.classes])
    # present and future heads: the current model's logits, scaled to 0.85 × the ground truth's
    # where they exceed it ("future-past")
    samples = xder.memory.samples(torch.arange(6))
    with torch.no_grad():
        now = state.model(state.model_input(samples.x, samples.e), samples.t)
    later = [c for c in range(10) if c not in exp0.classes]
    gt = before[kept].gather(1, samples.y.unsqueeze(1)).squeeze(1)
    top = now[:, later].max(1).values
    scale = torch.where(top > gt, 0.85 * gt / top, torch.ones_like(gt))
    assert torch.allclose(past[:, later], now[:, later] * scale.unsqueeze(1))
    assert (scale < 1).any()


def test_xder_past_constraint_lifts_the_present_head_and_predict_masks_other_tasks():
    state = make_state(scenario="task")
    xder = XDER(memory_size=10, alpha=0, beta=0, lambd=0, eta=0.1, m=0.3)
    state.experience = 4  # the last experience: no future heads, only the past constraint
    present = state.benchmark.train_stream[4].classes
    batch = state.benchmark.train_stream[4].subset(torch.arange(4))
    out = torch.zeros(4, 10)
    out[:, [c for c in range(10) if c not in present]] = 2.0  # old heads dominate
    out.requires_grad_(True)
    xder.penalty(state, batch, None, out).backward()
    assert (out.grad[:, present].min(1).values < 0).all()  # descending raises a present logit
    x = state.model_input(batch.x, batch.e)
    with torch.no_grad():
        logits = xder.predict(state, x, batch.t)
    assert (logits[:, [c for c in range(10) if c not in present]] == MASKED).all()


def test_strong_augmentation_is_seeded_keeps_shape_and_range():
    from clrun.strategies.augment import _shift_hue, strong_augment

    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    a = strong_augment(x, torch.Generator().manual_seed(1))
    b = strong_augment(x, torch.Generator().manual_seed(1))
    c = strong_augment(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, c) and a.min() >= 0 and a.max() <= 255
    gray = strong_augment(x[:, :1], torch.Generator().manual_seed(1))
    assert gray.shape == (6, 1, 8, 8)
    rgb = torch.rand(4, 3, 5, 5)
    assert torch.allclose(_shift_hue(rgb, torch.zeros(4)), rgb, atol=1e-5)  # a full turn of 0
    assert torch.allclose(
        _shift_hue(_shift_hue(rgb, torch.full((4,), 0.3)), torch.full((4,), 0.7)), rgb, atol=1e-4
    )
