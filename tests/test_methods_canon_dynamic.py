"""Model-growing class-incremental methods: Dynamic DER (Yan et al., CVPR 2021) and MEMO (Zhou et
al., ICLR 2023). Exact properties: frozen parts stay bit-identical, the parameter count grows by
one extractor (or specialised block set) per experience against a hand count, the auxiliary head
has n_new + 1 outputs and its loss is the one of the paper, a fresh model loads the grown one,
weight aligning and class-balanced subsets against hand computations, one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_cfg

from clrun import api
from clrun.components import RunState
from clrun.config import build, build_model
from clrun.errors import ConfigError
from clrun.models import adapt_model
from clrun.models.expandable import ExpandedBackbone, ExpandedClassifier
from clrun.strategies import MEMO, DynamicDER
from clrun.strategies.dynamic_der import weight_align
from clrun.strategies.utils import class_balanced_subset

MEMO_MODEL = ("model=resnet18_reduced", "model.nf=4")  # as tests/conftest.py's STRATEGY_ARGS
KEEP = "checkpoint.keep=every_experience"


def run_kept(tmp_path, *overrides: str):
    """A debug run through the API (its run dir has the config load_run needs) that keeps the
    model after every experience: (summary, run_dir)."""
    run_dir = tmp_path / "run"
    return api.run(api.compose(["debug=default", *overrides, KEEP]), run_dir), run_dir


@pytest.fixture(scope="module")
def der_run(tmp_path_factory):
    """One Dynamic DER debug run, shared by the tests that read it."""
    return run_kept(tmp_path_factory.mktemp("der"), "strategy=dynamic_der")


def rows(run_dir) -> dict[int, list[float]]:
    """Row i of the accuracy matrix from metrics.jsonl: the exact values evaluation gave."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["trained_through"] >= 0 and r.get("stream", "test") == "test" and "event" not in r:
            out.setdefault(r["trained_through"], []).append(r["acc"])
    return out


def state_dicts(run_dir, prefix: str) -> list[dict[str, torch.Tensor]]:
    """The parameters and buffers under ``prefix`` of the model kept after each experience."""
    out = []
    for i in range(5):
        sd = api.load_run(run_dir, experience=i).model.state_dict()
        out.append({k: v for k, v in sd.items() if k.startswith(prefix)})
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------ Dynamic DER


def test_dynamic_der_old_extractors_stay_bit_identical_and_params_match_a_hand_count(der_run):
    summary, run_dir = der_run
    # extractor i (weights and BatchNorm-free MLP biases) after it was trained == at the end
    for i in range(4):
        after_own = state_dicts(run_dir, f"backbone.branches.{i}.")[i]
        at_end = state_dicts(run_dir, f"backbone.branches.{i}.")[4]
        assert_same(after_own, at_end)
    # the MLP 400-400 on 8×8 inputs: one extractor = 64·400 + 400 + 400·400 + 400 parameters;
    # after experience i: i+1 extractors, a classifier of 2(i+1) units over 400(i+1) features
    extractor = 64 * 400 + 400 + 400 * 400 + 400
    for i, p in enumerate(summary["params_per_experience"]):
        units, features = 2 * (i + 1), 400 * (i + 1)
        assert p == (i + 1) * extractor + units * features + units, i


def test_a_fresh_model_loads_the_grown_one_and_scores_the_same(der_run):
    _, run_dir = der_run
    exact = rows(run_dir)
    for i in range(5):
        loaded = api.load_run(run_dir, experience=i)
        assert isinstance(loaded.model.backbone, ExpandedBackbone)
        assert len(loaded.model.backbone.branches) == i + 1
        assert loaded.model.backbone.n_frozen == i  # the freezing comes back too
        assert not any(p.requires_grad for p in loaded.model.backbone.branches[:i].parameters())
        assert loaded.evaluate() == exact[i], i


def build_state(*overrides: str) -> tuple[RunState, object]:
    cfg = make_cfg("debug=default", *overrides)
    bench = build(cfg.benchmark, "benchmark")
    torch.manual_seed(0)
    model = build_model(cfg, bench, torch.device("cpu"))
    buffer = build(cfg.buffer, "buffer", seed=0)
    state = RunState(model, bench, torch.device("cpu"), batch_size=32, buffer=buffer)
    return state, buffer


def test_auxiliary_head_has_n_new_plus_one_outputs_and_its_loss_is_added():
    state, buffer = build_state("strategy=dynamic_der")
    der = DynamicDER(buffer, aux_weight=0.5, correction="none")
    stream = state.benchmark.train_stream
    for i, exp in enumerate(stream[:3]):
        state.experience = i
        der.train_data(state, exp)
        der.pre_update(state, exp)
        adapt_model(state.model, exp)
        head = state.model.head
        assert isinstance(head, ExpandedClassifier)
        if i == 0:
            assert head.aux is None  # no old class yet: no auxiliary classifier
        else:
            new = sorted(set(exp.classes))
            assert head.aux.out_features == len(new) + 1
            assert head.aux.in_features == 400  # the newest extractor's features only
            old = sorted({c for e in stream[:i] for c in e.classes})
            assert head.aux_target[old].tolist() == [0] * len(old)
            assert head.aux_target[new].tolist() == list(range(1, len(new) + 1))
            # the loss: cross-entropy + λ_a × the auxiliary cross-entropy on the newest features
            batch = exp.subset(torch.arange(8))
            x = state.model_input(batch.x, batch.e)
            state.model.train()
            out = state.model(x, batch.t)
            aux = head.aux(state.model.backbone(x)[:, -400:])
            want = F.cross_entropy(out, batch.y) + 0.5 * F.cross_entropy(
                aux, head.aux_target[batch.y]
            )
            assert torch.allclose(der.loss(state, batch, x, out), want)
            assert head.aux_logits is None  # taken by the loss
        der.post_update(state, exp)
        assert state.model.head.aux is None  # dropped: the inference model is what is counted


def test_classifier_retraining_changes_only_the_classifier():
    state, buffer = build_state("strategy=dynamic_der")
    der = DynamicDER(buffer, retrain_epochs=2)
    stream = state.benchmark.train_stream
    for i, exp in enumerate(stream[:2]):
        state.experience = i
        der.train_data(state, exp)
        der.pre_update(state, exp)
        adapt_model(state.model, exp)
        before = {k: v.clone() for k, v in state.model.state_dict().items() if "_extra" not in k}
        der.post_update(state, exp)
        after = state.model.state_dict()
        kept = [k for k in after if "_extra" not in k and k != "head.aux_target"]
        changed = {k for k in kept if not torch.equal(before[k], after[k])}
        assert len(after["head.aux_target"]) == 0  # emptied with the auxiliary classifier
        # the first experience has no old class: no re-training; then the classifier alone
        assert changed == (set() if i == 0 else {"head.fc.weight", "head.fc.bias"}), i


# ------------------------------------------------------------------ MEMO


def test_memo_shared_blocks_freeze_after_the_first_experience_and_params_match(tmp_path):
    summary, run_dir = run_kept(tmp_path, "strategy=memo", *MEMO_MODEL)
    shared = state_dicts(run_dir, "backbone.shared.")
    for i in range(1, 5):
        assert_same(shared[0], shared[i])  # weights and BatchNorm statistics
    for i in range(4):
        branch = state_dicts(run_dir, f"backbone.branches.{i}.")
        assert_same(branch[i], branch[4])
    # the reduced ResNet-18 at nf=4 on 1-channel images, by hand (BatchNorm: 2 per channel):
    # generalised = stem (1·4·9 + 8) + stage 1 (2 × (2·4·4·9 + 2·8)) + stage 2 (4·8·9 + 16 +
    # 8·8·9 + 16 + 4·8 + 16, then 2·8·8·9 + 32) + stage 3 (the same at 8 → 16)
    stem = 1 * 4 * 9 + 8
    stage1 = 2 * (2 * 4 * 4 * 9 + 2 * 8)
    stage2 = (4 * 8 * 9 + 16 + 8 * 8 * 9 + 16 + 4 * 8 + 16) + (2 * 8 * 8 * 9 + 2 * 16)
    stage3 = (8 * 16 * 9 + 32 + 16 * 16 * 9 + 32 + 8 * 16 + 32) + (2 * 16 * 16 * 9 + 2 * 32)
    specialised = (16 * 32 * 9 + 64 + 32 * 32 * 9 + 64 + 16 * 32 + 64) + (2 * 32 * 32 * 9 + 2 * 64)
    generalised = stem + stage1 + stage2 + stage3
    for i, p in enumerate(summary["params_per_experience"]):
        units, features = 2 * (i + 1), 32 * (i + 1)
        assert p == generalised + (i + 1) * specialised + units * features + units, i


def test_memo_train_generalized_keeps_training_the_shared_blocks(tmp_path):
    _, run_dir = run_kept(tmp_path, "strategy=memo", *MEMO_MODEL, "strategy.train_generalized=true")
    shared = state_dicts(run_dir, "backbone.shared.")
    assert any(not torch.equal(shared[0][k], shared[4][k]) for k in shared[0])


def test_memo_incremental_step_is_the_authors(tmp_path):
    """One MEMO step at the second experience against the authors' models/memo.py
    (``_update_representation``, ``set_network``, ``AdaptiveNet.weight_align``): gradient to the
    newest specialised blocks and both classifiers only; the generalised and old specialised
    blocks in eval mode (BatchNorm statistics kept), the newest in train mode; the loss
    CE(all seen classes) + α·CE(aux, ``where(y - known + 1 > 0, y - known + 1, 0)``); then the
    new rows scaled by mean ‖old row‖ / mean ‖new row‖, old rows and every bias unchanged."""
    state, buffer = build_state("strategy=memo", *MEMO_MODEL)
    memo = MEMO(buffer, aux_weight=0.5)
    model, stream = state.model, state.benchmark.train_stream
    for i in range(2):
        state.experience = i
        data = memo.train_data(state, stream[i])
        memo.pre_update(state, stream[i])
        adapt_model(model, data)
        if i == 0:
            memo.post_update(state, stream[i])
    backbone, head = model.backbone, model.head
    known = len(stream[0].classes)
    assert head.aux.in_features == backbone.branch_features == 32  # the newest block set only
    model.train()
    assert not backbone.shared.training and not backbone.branches[0].training
    assert backbone.branches[1].training
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    n = len(data)  # the experience's samples, then the exemplars
    batch = data.subset(torch.cat([torch.arange(12), torch.arange(n - 12, n)]))
    old = torch.isin(batch.y, torch.tensor(stream[0].classes))
    assert old.any() and not old.all()  # new samples and exemplars
    x = state.model_input(batch.x, batch.e, train=True)
    out = model(x, batch.t)
    aux = head.aux_logits
    # the authors' labels are positions in the order of appearance (head.classes' order)
    position = {c: j for j, c in enumerate(head.classes.tolist())}
    y = torch.tensor([position[c] for c in batch.y.tolist()])
    target = torch.where(y - known + 1 > 0, y - known + 1, 0)
    want = F.cross_entropy(out[:, head.classes], y) + 0.5 * F.cross_entropy(aux, target)
    loss = memo.loss(state, batch, x, out)
    assert torch.allclose(loss, want)
    loss.backward()
    with_grad = {
        n.split(".")[0] + "." + n.split(".")[1]
        for n, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert with_grad == {"backbone.branches", "head.fc", "head.aux"}
    assert all(p.grad is None for p in backbone.branches[0].parameters())
    after = model.state_dict()
    for k, v in stats.items():
        frozen = k.startswith(("backbone.shared.", "backbone.branches.0."))
        assert torch.equal(after[k], v) == frozen, k
    # weight aligning after the experience: the authors' AdaptiveNet.weight_align by hand
    w, b = head.fc.weight.detach().clone(), head.fc.bias.detach().clone()
    n_new = len(head.classes) - known
    gamma = w[:known].norm(dim=1).mean() / w[known:].norm(dim=1).mean()
    memo.post_update(state, stream[1])
    assert torch.equal(head.fc.weight[:known], w[:known])
    assert torch.allclose(head.fc.weight[known:], w[known:] * gamma)
    assert torch.equal(head.fc.bias, b) and n_new == 2


def test_memo_refuses_a_model_without_a_split_in_one_line(run_debug):
    with pytest.raises(ConfigError, match="MEMO splits the backbone") as err:
        run_debug("strategy=memo")  # the debug MLP
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("strategy", ["dynamic_der", "memo"])
def test_class_incremental_only(run_debug, strategy):
    args = ("benchmark.scenario=task", "model.head=multi")
    with pytest.raises(ConfigError, match="class-incremental only") as err:
        run_debug(f"strategy={strategy}", *MEMO_MODEL, *args)
    assert "\n" not in str(err.value)


def test_buffer_none_is_refused():
    with pytest.raises(ConfigError, match="buffer=none is not supported"):
        MEMO(None)


# ------------------------------------------------------------------ helpers, by hand


def test_weight_align_by_hand():
    w = torch.tensor([[3.0, 4.0], [0.0, 5.0], [1.0, 0.0], [0.0, 3.0]])  # norms 5, 5 | 1, 3
    weight_align(w, 2)
    assert torch.allclose(w, torch.tensor([[3.0, 4.0], [0.0, 5.0], [2.5, 0.0], [0.0, 7.5]]))


def test_class_balanced_subset_cuts_every_class_to_the_smallest():
    y = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)
    idx = class_balanced_subset(y, torch.Generator().manual_seed(0))
    assert torch.bincount(y[idx]).tolist() == [3, 3, 3]
    assert len(set(idx.tolist())) == 9  # no sample twice


@pytest.mark.parametrize("reuse", [True, False])
def test_grown_classifier_keeps_or_redraws_the_old_weights(reuse):
    head = ExpandedClassifier(3, 10)
    head.adaptation(type("E", (), {"classes": [0, 1]})())
    old = head.fc.weight.detach().clone()
    head.grow_features(2, reuse=reuse)
    assert head.fc.weight.shape == (2, 5)
    assert torch.equal(head.fc.weight[:, :3], old) == reuse
