"""Continual unlearning: the amnesiac component's records, buffer purging, the components'
unlearn hooks, the runner's requests, reference runs and the unlearning metrics."""

import json
import math

import pytest
import torch
from conftest import round_trip
from omegaconf import OmegaConf
from torch import nn

from clrun import unlearning
from clrun.benchmarks import Experience, synthetic
from clrun.buffers import ClassBalancedBuffer, ReservoirBuffer
from clrun.components import Components, RunState
from clrun.config import ConfigError
from clrun.models import CLModel, adapt_model, make_head, mlp
from clrun.strategies import EWC, MAS, SI, Amnesiac, Cumulative, LwF, RWalk
from clrun.strategies.amnesiac import _float_state

# --------------------------------------------------------------------------- driving components


def _setup(model: str = "mlp", head: str = "single", scenario: str = "class") -> RunState:
    torch.manual_seed(0)
    bench = synthetic(scenario=scenario, n_experiences=3, n_classes=6, train_per_class=40)
    if model == "batchnorm":  # running statistics are model state too
        body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU())
        net = CLModel(body, make_head(head, 16, bench.n_classes))
    else:
        net = mlp(bench.input_shape, bench.n_classes, head=head, hidden_sizes=[16])
    return RunState(net, bench, torch.device("cpu"), batch_size=16)


def _learn(state: RunState, components: Components, exp: Experience, steps: int = 8) -> None:
    """What the runner does for one experience: pre_update, grow, train with its own loop,
    post_update."""
    from clrun.run import train_experience

    state.experience = exp.index
    for hook in components["pre_update"]:
        hook(state, exp)
    adapt_model(state.model, exp)
    state.optimizer = torch.optim.SGD(state.model.parameters(), lr=0.1, momentum=0.9)
    settings = OmegaConf.create({"batch_size": 16, "iterations": steps, "epochs": 1})
    train_experience(
        state,
        exp,
        components,
        torch.Generator().manual_seed(exp.index),
        settings,
        lambda where: None,
    )
    for hook in components["post_update"]:
        hook(state, exp)


def _trained(component, experiences: int, **setup) -> RunState:
    """A run state after ``experiences`` experiences learned with this one component."""
    state = _setup(**setup)
    for exp in state.benchmark.train_stream[:experiences]:
        _learn(state, Components({"c": component}), exp)
    return state


# --------------------------------------------------------------------------- amnesiac


@pytest.mark.parametrize("model", ["mlp", "batchnorm"])
def test_recorded_updates_sum_to_the_total_change(model):
    state = _setup(model)
    amnesiac = Amnesiac()
    components = Components({"amnesiac": amnesiac})
    initial = _float_state(state.model)
    for exp in state.benchmark.train_stream:
        _learn(state, components, exp)
    final = _float_state(state.model)
    assert sorted(amnesiac.updates) == [0, 1, 2]
    for name, theta in final.items():
        total = sum(u[name] for u in amnesiac.updates.values())
        torch.testing.assert_close(total, theta - initial[name], atol=1e-5, rtol=0)
        assert any(u[name].abs().sum() > 0 for u in amnesiac.updates.values()), name
    assert amnesiac.memory_mb() > 0


@pytest.mark.parametrize("head", ["single", "incremental", "multi"])
def test_unlearning_the_only_experience_returns_the_initial_parameters(head):
    state = _setup(head=head)
    amnesiac = Amnesiac()
    components = Components({"amnesiac": amnesiac})
    exp = state.benchmark.train_stream[0]
    grown = _setup(head=head).model  # the same model, grown for the experience, untrained
    torch.manual_seed(1)  # the same initial values for the grown units
    adapt_model(grown, exp)
    torch.manual_seed(1)
    _learn(state, components, exp)
    assert any((state.model.state_dict()[n] != v).any() for n, v in _float_state(grown).items())
    assert state.optimizer.state
    amnesiac.unlearn(state, [0])
    assert not state.optimizer.state  # momentum held the forgotten gradients
    for name, v in _float_state(grown).items():
        torch.testing.assert_close(state.model.state_dict()[name], v, atol=1e-6, rtol=0)
    assert amnesiac.updates == {} and amnesiac.memory_mb() == 0


def test_unlearning_subtracts_the_forgotten_update_and_resets_its_units():
    amnesiac = Amnesiac()
    state = _trained(amnesiac, 3, head="multi", scenario="task")
    before = _float_state(state.model)
    delta = {n: d.clone() for n, d in amnesiac.updates[1].items()}
    init_head = {n: v.clone() for n, (_, v) in amnesiac.created[1].items()}
    later = amnesiac.updates[2]["head.heads.1.linear.weight"].clone()
    assert later.abs().sum() == 0  # plain fine-tuning never touches an old task's head
    amnesiac.unlearn(state, [1])
    after = _float_state(state.model)
    assert sorted(init_head) == ["head.heads.1.linear.bias", "head.heads.1.linear.weight"]
    for name, v in after.items():
        if name in init_head:
            torch.testing.assert_close(v, init_head[name])  # the task's own head: back to init
        else:
            torch.testing.assert_close(v, before[name] - delta.get(name, 0), atol=1e-6, rtol=0)
    assert sorted(amnesiac.updates) == [0, 2] and 1 not in amnesiac.created


def test_incremental_units_of_a_forgotten_experience_go_back_to_their_init():
    amnesiac = Amnesiac()
    state = _trained(amnesiac, 2, head="incremental")
    old, init = amnesiac.created[1]["head.units.linear.weight"]
    assert old == (2, 16) and init.shape == (4, 16)
    amnesiac.unlearn(state, [1])
    w = state.model.state_dict()["head.units.linear.weight"]
    torch.testing.assert_close(w[2:], init[2:])  # classes of experience 1
    assert amnesiac.updates[0]["head.units.linear.weight"].shape == (2, 16)


def test_amnesiac_state_round_trips_and_unlearns_identically():
    state = _setup(head="incremental")
    amnesiac = Amnesiac()
    for exp in state.benchmark.train_stream:
        _learn(state, Components({"amnesiac": amnesiac}), exp)
    other = Amnesiac()
    other.load_state_dict(round_trip(amnesiac))
    copy = _setup(head="incremental")
    for exp in state.benchmark.train_stream:
        adapt_model(copy.model, exp)
    copy.model.load_state_dict(state.model.state_dict())
    amnesiac.unlearn(state, [0, 2])
    other.unlearn(copy, [0, 2])
    for name, v in _float_state(state.model).items():
        torch.testing.assert_close(copy.model.state_dict()[name], v, atol=0, rtol=0)


def test_repair_trains_on_the_buffer_and_is_recorded():
    state = _setup()
    state.buffer = ReservoirBuffer(50, seed=0)
    amnesiac = Amnesiac(repair_steps=3, repair_batch_size=8)
    components = Components({"amnesiac": amnesiac})
    for exp in state.benchmark.train_stream:
        _learn(state, components, exp)
        state.buffer.update(exp)
    initial_total = {n: sum(u[n] for u in amnesiac.updates.values()) for n in amnesiac.updates[0]}
    before = _float_state(state.model)
    delta = {n: d.clone() for n, d in amnesiac.updates[1].items()}
    state.buffer.purge([1])
    amnesiac.unlearn(state, [1])
    after = _float_state(state.model)
    repaired = False
    for name in after:  # the model moved by −Δ1 and by the repair, which experience 2 now holds
        total = sum(u[name] for u in amnesiac.updates.values())
        torch.testing.assert_close(
            total, initial_total[name] + after[name] - before[name], atol=1e-5, rtol=0
        )
        repaired |= not torch.allclose(after[name], before[name] - delta[name], atol=1e-4)
    assert repaired


@pytest.mark.parametrize(
    "bad,message",
    [({"repair_steps": -1}, "repair_steps=-1"), ({"repair_batch_size": 0}, "repair_batch_size=0")],
)
def test_bad_amnesiac_hyperparameters(bad, message):
    with pytest.raises(ValueError, match=message):
        Amnesiac(**bad)


def test_repair_without_a_buffer_is_a_config_error():
    state = _setup()
    with pytest.raises(ConfigError, match="repair_steps=5.*amnesiac_replay"):
        Amnesiac(repair_steps=5).pre_update(state, state.benchmark.train_stream[0])


# --------------------------------------------------------------------------- buffers, components


def _samples(n_per: int = 10) -> Experience:
    e = torch.arange(3).repeat_interleave(n_per)
    return Experience(
        -1,
        torch.arange(3 * n_per, dtype=torch.uint8).view(-1, 1),
        e * 2 + torch.arange(3 * n_per) % 2,
        torch.zeros_like(e),
        e,
    )


@pytest.mark.parametrize(
    "make", [lambda: ReservoirBuffer(100), lambda: ClassBalancedBuffer(100, groupby="class")]
)
def test_forgotten_samples_are_gone_from_buffers(make):
    buffer, data = make(), _samples()
    buffer.update(data, logits=torch.arange(30.0).view(-1, 1))
    assert buffer.purge([1]) == 10
    assert len(buffer) == 20 and not (buffer.data["e"] == 1).any()
    assert torch.equal(buffer.get("logits").view(-1).long(), buffer.data["x"].view(-1).long())
    assert buffer.purge([1]) == 0
    if isinstance(buffer, ClassBalancedBuffer):
        assert sorted(buffer.groups) == [0, 1, 4, 5]  # classes 2, 3 were experience 1's
        buffer.update(
            Experience(-1, *(getattr(data, f)[:4] for f in "xyte")), logits=torch.zeros(4, 1)
        )
        assert buffer.quotas() == {0: 25, 1: 25, 4: 25, 5: 25}


def test_lwf_forgets_the_classes_and_retakes_its_teacher():
    lwf = LwF()
    state = _trained(lwf, 2, head="incremental")
    c0, c1 = (sorted(e.classes) for e in state.benchmark.train_stream[:2])
    assert lwf.old_classes == sorted(c0 + c1)
    lwf.forget(state, [0])
    assert lwf.old_classes == c1 and lwf.retake_teacher
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(1.0)  # what an unlearning method might do to the model
    lwf.load_state_dict(round_trip(lwf))
    lwf.pre_update(state, state.benchmark.train_stream[2])
    for a, b in zip(lwf.teacher.parameters(), state.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not lwf.retake_teacher and lwf._units.tolist() == c1


@pytest.mark.parametrize("make", [SI, MAS, RWalk], ids=["si", "mas", "rwalk"])
def test_importance_methods_reanchor_at_the_unlearned_model(make):
    method = make()
    state = _trained(method, 2)
    kept = "weights" if make is RWalk else "importance"
    importance = {n: v.clone() for n, v in getattr(method, kept).items()}
    method.forget(state, [0])
    method.load_state_dict(round_trip(method))
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(0.5)
    method.pre_update(state, state.benchmark.train_stream[2])
    for name, p in state.model.named_parameters():
        assert torch.equal(method.anchor[name], p)
    assert all(torch.equal(getattr(method, kept)[n], v) for n, v in importance.items())


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_ewc_drops_forgotten_terms_and_reanchors(mode):
    ewc = EWC(mode=mode, fisher_samples=16)
    state = _trained(ewc, 2)
    ewc.forget(state, [0])
    expected = [[1]] if mode == "separate" else [[0, 1]]
    assert [t["experiences"] for t in ewc.terms] == expected
    with torch.no_grad():
        for p in state.model.parameters():
            p.add_(0.5)
    ewc.pre_update(state, state.benchmark.train_stream[2])
    for term in ewc.terms:
        for name, p in state.model.named_parameters():
            assert torch.equal(term["params"][name], p)


def test_cumulative_leaves_forgotten_experiences_out():
    state = _setup()
    cumulative = Cumulative()
    cumulative.forget(state, [0])
    cumulative.load_state_dict(round_trip(cumulative))
    data = cumulative.train_data(state, state.benchmark.train_stream[2])
    assert sorted(data.e.unique().tolist()) == [1, 2]
    assert len(data) == sum(len(state.benchmark.train_stream[k]) for k in (1, 2))


def test_js_divergence_exact_values():
    p = torch.log(torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]]).clamp(min=1e-30))
    q = torch.log(torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.1, 0.9]]).clamp(min=1e-30))
    js = unlearning.js_divergence(p, q)
    m = torch.tensor([0.5, 0.5])
    kl = (torch.tensor([0.9, 0.1]) * (torch.tensor([0.9, 0.1]) / m).log()).sum()
    torch.testing.assert_close(js, torch.tensor([math.log(2), 0.0, kl.item()]))
    torch.testing.assert_close(unlearning.js_divergence(q, p), js)


# --------------------------------------------------------------------------- the runner


def test_end_to_end_request_with_reference(run_debug):
    summary, run_dir = run_debug(
        "strategy=amnesiac_replay", "unlearning.requests={2: [1]}", "strategy.repair_steps=5"
    )
    assert summary["status"] == "completed"
    block = summary["unlearning"]
    (event,) = block["events"]
    assert event["after_experience"] == 2 and event["forgotten"] == [1]
    assert event["buffer_samples_removed"] > 0
    assert event["forgotten_acc_before"] > 0.8 > event["forgotten_acc_after"]
    assert block["forgotten"] == [1] and block["final_retained_acc"] is not None
    assert summary["component_memory_mb"]["amnesiac"] > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timeline = [(r["trained_through"], r.get("event")) for r in rows if r["eval_exp"] == 0]
    assert timeline == [
        (-1, None),
        (0, None),
        (1, None),
        (2, None),
        (2, "unlearned"),
        (3, None),
        (4, None),
    ]
    saved = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)
    assert not (saved["buffer"]["data"]["e"] == 1).any()
    reference = block["reference"]
    ref_summary = json.loads((run_dir / "reference" / "summary.json").read_text())
    assert ref_summary["status"] == "completed" and ref_summary["unlearning"]["exclude"] == [1]
    ref_saved = torch.load(run_dir / "reference" / "checkpoint" / "state.pt", weights_only=True)
    assert [t["steps"] for t in ref_saved["recorder"]["timings"]][:3] == [26, 0, 26]
    ref_final = (run_dir / "reference" / "acc_matrix.csv").read_text().splitlines()[-1]
    assert [round(a, 6) for a in reference["reference_acc"]] == [
        float(a) for a in ref_final.split(",")
    ]
    assert len(reference["acc_diff"]) == 5 and set(reference["forgotten"]) == {"1"}
    assert 0 <= reference["forgotten"]["1"]["js_divergence"] <= math.log(2) + 1e-6
    assert (run_dir / "unlearning.png").stat().st_size > 10_000

    # the same comparison against that reference, given as a path, without retraining it
    again, _ = run_debug(
        "strategy=amnesiac_replay",
        "unlearning.requests={2: [1]}",
        "strategy.repair_steps=5",
        f"unlearning.reference={run_dir / 'reference'}",
    )
    assert again["unlearning"]["reference"]["forgotten"] == reference["forgotten"]
    # ... and a reference that trained on the forgotten experience is refused before training
    with pytest.raises(ConfigError, match=r"trained on experiences \[1\]"):
        run_debug(
            "strategy=amnesiac_naive",
            "unlearning.requests={3: [1]}",
            f"unlearning.reference={run_dir}",
        )


def test_disable_runs_the_same_config_without_unlearning(run_debug):
    summary, run_dir = run_debug(
        "strategy=amnesiac_lwf", "unlearning.requests={2: [1]}", "unlearning.disable=true"
    )
    assert summary["status"] == "completed" and summary["unlearning"]["disabled"] is True
    assert summary["unlearning"]["events"] == [] and "reference" not in summary["unlearning"]
    assert "unlearned" not in (run_dir / "metrics.jsonl").read_text()
    assert not (run_dir / "reference").exists()
    plain, _ = run_debug("strategy=amnesiac_lwf")
    assert plain["final_avg_acc"] == summary["final_avg_acc"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["strategy=lwf", "unlearning.requests={2: [1]}"], "has no unlearning method"),
        (
            ["strategy=amnesiac_naive", "unlearning.requests={5: [1]}"],
            r"key 5 must be an experience index",
        ),
        (
            ["strategy=amnesiac_naive", "unlearning.requests={1: [2]}"],
            r"experience 2 cannot be forgotten after experience 1",
        ),
        (["strategy=amnesiac_naive", "unlearning.requests={1: [0], 2: [0]}"], "forgotten twice"),
        (["strategy=amnesiac_naive", "unlearning.requests={1: []}"], "non-empty list"),
        (["strategy=amnesiac_naive", "unlearning.exclude=[7]"], r"unlearning.exclude=\[7\]"),
        (
            [
                "strategy=amnesiac_naive",
                "unlearning.requests={1: [0]}",
                "unlearning.reference=/nonexistent",
            ],
            "not a completed run directory",
        ),
        (
            [
                "strategy=joint",
                "unlearning.requests={1: [0]}",
                "+strategy.components.amnesiac={_target_: clrun.strategies.Amnesiac}",
            ],
            r"component 'joint'",
        ),
    ],
)
def test_bad_requests_fail_before_training(run_debug, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_debug(*overrides)


@pytest.mark.parametrize("strategy", ["amnesiac_naive", "amnesiac_lwf", "amnesiac_ewc"])
def test_task_incremental_request_keeps_the_retained_experiences(run_debug, strategy):
    summary, _ = run_debug(
        f"strategy={strategy}",
        "benchmark.scenario=task",
        "model.head=multi",
        "unlearning.requests={3: [1]}",
        "unlearning.reference=null",
    )
    block = summary["unlearning"]
    assert block["events"][0]["forgotten_acc_before"] > 0.9
    assert block["final_retained_acc"] > 0.9
    assert "reference" not in block


def test_online_stream_records_per_original_experience(run_debug):
    summary, _ = run_debug(
        "strategy=amnesiac_naive",
        "benchmark.online_batch_size=64",
        "unlearning.requests={4: [0, 2]}",
        "unlearning.reference=null",
    )
    (event,) = summary["unlearning"]["events"]
    assert event["forgotten"] == [0, 2] and summary["status"] == "completed"


@pytest.mark.parametrize("kill_at", [60, 90])  # before and after the request (end of step 78)
def test_killed_run_with_a_request_resumes_to_the_same_result(run_debug, tmp_path, kill_at):
    import signal

    from conftest import clrun

    overrides = (
        "strategy=amnesiac_replay",
        "strategy.repair_steps=3",
        "unlearning.requests={2: [1]}",
        "unlearning.reference=null",
        "+strategy.components.zkill._target_=killer.KillAt",
        "checkpoint.every_n_steps=4",
    )
    _, uninterrupted = run_debug(*overrides)
    run_dir = tmp_path / "killed"
    p = clrun(
        "debug=default",
        *overrides,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"CLRUN_TEST_KILL_AT": f"{kill_at}:SIGKILL"},
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    resumed, _ = run_debug(*overrides, run_dir=run_dir)
    assert resumed["status"] == "completed"
    for name in ("acc_matrix.csv", "metrics.jsonl"):
        assert (run_dir / name).read_text() == (uninterrupted / name).read_text(), name
    a, b = (
        torch.load(d / "checkpoint" / "state.pt", weights_only=True)
        for d in (run_dir, uninterrupted)
    )
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_split_mnist_task_il_amnesiac_lwf_forgets_one_experience(tmp_path):
    """The issue's worked example on real data: forgetting experience 1 after experience 4."""
    from conftest import clrun

    run_dir = tmp_path / "run"
    p = clrun(
        "strategy=amnesiac_lwf",
        "model.head=multi",
        "benchmark.scenario=task",
        "unlearning.requests={4: [1]}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    block = json.loads((run_dir / "summary.json").read_text())["unlearning"]
    (event,) = block["events"]
    assert event["forgotten_acc_before"] > 0.95 and event["retained_acc_before"] > 0.95
    assert block["final_forgotten_acc"] < 0.85  # 2-way tasks: chance is 0.5
    assert block["final_retained_acc"] > 0.95
    reference = block["reference"]
    assert 0.3 < reference["reference_acc"][1] < 0.7  # never trained: its head is at chance
    assert max(abs(d) for j, d in enumerate(reference["acc_diff"]) if j != 1) < 0.05
    assert (run_dir / "unlearning.png").exists()


@pytest.mark.parametrize(
    "strategy",
    [
        "gem",
        "agem",
        "si",
        "mas",
        "rwalk",
        "er_ace",
        "icarl",
        "der",
        "replay_lwf",
        "replay_ewc",
        "cumulative",
        "gdumb",
        "xder",
    ],
)
def test_methods_with_a_forget_hook_unlearn_with_amnesiac(run_debug, strategy):
    summary, run_dir = run_debug(
        f"strategy={strategy}",
        "unlearning.requests={2: [1]}",
        "unlearning.reference=null",
        "+strategy.components.amnesiac={_target_: clrun.strategies.Amnesiac}",
    )
    assert summary["status"] == "completed" and len(summary["unlearning"]["events"]) == 1
    saved = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)["components"]
    if strategy in ("gem", "agem"):
        assert all(not (m["e"] == 1).any() for _, m in saved[strategy]["memory"])
    if strategy in ("icarl", "gdumb", "xder"):
        assert not (saved[strategy]["memory"]["data"]["e"] == 1).any()
