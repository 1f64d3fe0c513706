"""BiC, WA and FOSTER: the parts with exact answers (aligned norms, the bias-correction layer and
its fit, the frozen old extractor, the compressed model's size, a grown model loading into a
fresh one), and each method end to end on the debug config."""

import json
import math

import pytest
import torch
from conftest import make_cfg

from clrun.benchmarks import Experience
from clrun.buffers import ReservoirBuffer
from clrun.components import RunState
from clrun.config import build
from clrun.models import adapt_model, mlp
from clrun.strategies.bic import BiC, correct_logits, fit_bias
from clrun.strategies.foster import FOSTER, BoostedBackbone, BoostingHead, boost
from clrun.strategies.wa import align_weights


def final_state(run_dir) -> dict:
    return torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)


def experience(classes: list[int], n_per_class: int = 4, index: int = 0) -> Experience:
    y = torch.tensor(classes).repeat_interleave(n_per_class)
    x = torch.rand(len(y), 1, 4, 4, generator=torch.Generator().manual_seed(index))
    zeros = torch.zeros_like(y)
    return Experience(index, x, y, zeros, zeros + index)


# ------------------------------------------------------------------------------------------- WA


def test_weight_aligning_gives_new_classes_the_old_mean_norm_by_hand():
    linear = torch.nn.Linear(2, 4, bias=False)
    with torch.no_grad():  # norms 3 and 4 (old: mean 3.5); 1 and 2 (new: mean 1.5)
        linear.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.6, 0.8], [2.0, 0.0]]))
    gamma = align_weights(linear, torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert gamma == pytest.approx(3.5 / 1.5)
    norms = linear.weight.norm(dim=1)
    assert norms[2:].mean().item() == pytest.approx(3.5, rel=1e-6)
    assert norms[:2].tolist() == [3.0, 4.0]  # the old vectors are untouched
    assert torch.allclose(linear.weight[2], torch.tensor([0.6, 0.8]) * 3.5 / 1.5)


def test_wa_end_to_end_leaves_aligned_non_negative_weights(run_debug):
    summary, run_dir = run_debug("strategy=wa", "model.head=incremental")
    assert summary["status"] == "completed"
    saved = final_state(run_dir)["model"]
    weight, classes = saved["head.units.linear.weight"], saved["head.units.classes"]
    bench = build(make_cfg("debug=default").benchmark, "benchmark")
    last = torch.isin(classes, torch.tensor(bench.train_stream[-1].classes))
    assert 0 < last.sum() < len(classes)
    norms = weight.norm(dim=1)
    new_rows, old_rows = last, ~last
    assert norms[new_rows].mean().item() == pytest.approx(norms[old_rows].mean().item(), rel=1e-5)
    assert (weight >= 0).all()  # weight clipping after every step (γ > 0 keeps it)


# ------------------------------------------------------------------------------------------ BiC


def test_bias_correction_changes_only_the_new_classes_logits():
    out = torch.randn(6, 10)
    new = torch.tensor([7, 2])
    q = correct_logits(out, torch.tensor(0.5), torch.tensor(-1.25), new)
    old = [c for c in range(10) if c not in (7, 2)]
    assert torch.equal(q[:, old], out[:, old])  # bit for bit
    assert torch.allclose(q[:, new], 0.5 * out[:, new] - 1.25)


def test_bias_correction_fit_matches_the_closed_form():
    """Two classes, old logit 0, new logit ±1: at +1 three of four samples are new, at −1 one
    of four. The corrected logit α·o + β is then a saturated logistic model whose optimum
    satisfies σ(α + β) = 3/4 and σ(−α + β) = 1/4: α = log 3, β = 0."""
    o = torch.tensor([1.0] * 4 + [-1.0] * 4)
    logits = torch.stack([torch.zeros(8), o], dim=1)
    y = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0])
    gen = torch.Generator().manual_seed(0)
    alpha, beta = fit_bias(logits, y, torch.tensor([1]), 400, 0.5, batch_size=8, generator=gen)
    assert alpha.item() == pytest.approx(math.log(3), abs=1e-3)
    assert beta.item() == pytest.approx(0.0, abs=1e-3)


def test_bic_keeps_every_past_correction_on_its_own_classes():
    """Two past experiences: classes [1, 2] corrected by (2, 1), class [4] by (0.5, −3); the
    other columns are copied as they are (PyCIL's one frozen bias layer per task)."""
    bic = BiC(ReservoirBuffer(10))
    bic.corrections = [
        {"alpha": torch.tensor(2.0), "beta": torch.tensor(1.0), "classes": [1, 2]},
        {"alpha": torch.tensor(0.5), "beta": torch.tensor(-3.0), "classes": [4]},
    ]
    out = torch.tensor([[1.0, 2.0, 3.0, 4.0, 6.0]])
    assert bic.corrected(out).tolist() == [[1.0, 5.0, 7.0, 4.0, 0.0]]


def test_bic_end_to_end_corrects_each_experience_at_evaluation(run_debug):
    summary, run_dir = run_debug("strategy=bic", "strategy.bias_epochs=50")
    assert summary["status"] == "completed"
    bic = final_state(run_dir)["components"]["bic"]
    bench = build(make_cfg("debug=default").benchmark, "benchmark")
    later = [e.classes for e in bench.train_stream[1:]]
    assert [c["classes"] for c in bic["corrections"]] == later  # none for the first experience
    last = bic["corrections"][-1]
    assert last["alpha"].item() != 1.0 or last["beta"].item() != 0.0  # stage 2 moved α, β


# --------------------------------------------------------------------------------------- FOSTER


def _trained_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = mlp((1, 4, 4), 4, head="incremental", hidden_sizes=(8,))
    adapt_model(model, experience([0, 1]))
    return model


def test_foster_old_extractor_gets_no_gradient_while_boosting():
    model = _trained_model()
    old_weights = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    component = FOSTER(ReservoirBuffer(10))
    state = RunState(model, None, torch.device("cpu"), batch_size=8)
    component.old_classes = [0, 1]
    component._units = torch.tensor([0, 1, 2, 3])
    component._w1 = component._w2 = torch.ones(4)
    boost(model, [0, 1], [0, 1, 2, 3])
    new = experience([2, 3], index=1)
    adapt_model(model, new)  # what the runner does after pre_update
    assert isinstance(model.backbone, BoostedBackbone) and isinstance(model.head, BoostingHead)
    batch = experience([0, 1, 2, 3], index=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    assert not model.backbone.old.training  # frozen: eval mode inside a training model
    out = model(batch.x, batch.t)
    loss = component.loss(state, batch, batch.x, out)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.backbone.old.parameters())
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.new.parameters()
    )
    for k, v in model.backbone.old.state_dict().items():
        assert torch.equal(v, old_weights[k]), k


def test_foster_boosting_head_starts_from_the_old_head():
    model = _trained_model()
    x = torch.rand(5, 1, 4, 4)
    before = model(x)[:, :2]
    boost(model, [0, 1], [0, 1, 2, 3])
    fc = model.head.fc.linear
    width = model.head.width
    old = model.head.original.units.linear
    assert torch.equal(fc.weight[:2, :width], old.weight) and torch.equal(fc.bias[:2], old.bias)
    model.eval()
    _, old_logits = model.head.auxiliary(model.backbone(x), None)
    assert torch.allclose(old_logits[:, :2], before)  # the old head on the old features


def test_a_boosting_model_loads_into_a_freshly_built_one():
    model = _trained_model()
    boost(model, [0, 1], [0, 1, 2, 3])
    adapt_model(model, experience([2, 3], index=1))
    saved = model.state_dict()
    fresh = mlp((1, 4, 4), 4, head="incremental", hidden_sizes=(8,))
    fresh.load_state_dict(saved)
    assert isinstance(fresh.backbone, BoostedBackbone) and fresh.state_dict().keys() == saved.keys()
    x = torch.rand(5, 1, 4, 4)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    assert not any(p.requires_grad for p in fresh.backbone.old.parameters())


def test_foster_compressed_model_has_the_original_size(run_debug):
    _, naive_dir = run_debug("strategy=naive", "model.head=incremental")
    summary, run_dir = run_debug(
        "strategy=foster", "model.head=incremental", "strategy.compression_epochs=2"
    )
    assert summary["status"] == "completed"
    naive = json.loads((naive_dir / "summary.json").read_text())["params_per_experience"]
    assert summary["params_per_experience"] == naive


class SlowHead:
    """A component that only asks for a slower head (lr_scales): the run's optimiser factory."""

    lr_scales = {"head.": 0.5}


def test_foster_compression_rebuilds_the_runs_optimiser(run_debug):
    # after compression the optimiser is the run's (its parameter groups, the head at × 0.5),
    # as a resumed run rebuilds it (it was rebuilt with the optimiser's class alone: one group)
    slow = f"+strategy.components.slow._target_={__name__}.SlowHead"
    summary, run_dir = run_debug("strategy=foster", "strategy.compression_epochs=1", slow)
    assert summary["status"] == "completed"
    saved = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)["optimizer"]
    assert [g["lr_scale"] for g in saved["param_groups"]] == [1.0, 0.5]
