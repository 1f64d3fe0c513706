"""The validation split (``benchmark.validation``), task-IL accuracy from the same forward pass,
and ``optimize``, the summary field a sweeper gets."""

import json

import numpy as np
import pytest
import torch
from conftest import make_cfg

from clrun.benchmarks import online_stream, permuted_mnist, split_by_class, synthetic
from clrun.benchmarks.core import hold_out_validation
from clrun.config import check_objective, objective, validate
from clrun.errors import ConfigError
from clrun.outcome import closing_lines


def numbered(n_per_class: int = 30, n_classes: int = 6):
    """A benchmark whose every input is its own sample number, so splits can be checked."""
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = torch.arange(len(y), dtype=torch.float32).unsqueeze(1)
    data = {"x_train": x, "y_train": y, "x_test": x[:12], "y_test": y[:12] % n_classes}
    return split_by_class(
        "numbered",
        data,
        scenario="class",
        n_experiences=3,
        class_order=list(range(n_classes)),
        seed=0,
        mean=0.0,
        std=1.0,
        n_classes=n_classes,
        pixel_scale=1.0,
    )


def ids(ex) -> set[int]:
    return set(ex.x[:, 0].long().tolist())


def test_validation_is_disjoint_from_training_stratified_and_seeded():
    whole = numbered()
    b = hold_out_validation(numbered(), 0.2, seed=5)
    assert len(b.validation_stream) == len(b.train_stream) == 3
    for full, tr, va in zip(whole.train_stream, b.train_stream, b.validation_stream, strict=True):
        assert ids(tr).isdisjoint(ids(va)) and ids(tr) | ids(va) == ids(full)
        assert va.index == tr.index and torch.equal(va.e, torch.full_like(va.y, tr.index))
        for c in full.classes:  # 30 per class: 6 held out of each
            assert int((va.y == c).sum()) == 6 and int((tr.y == c).sum()) == 24
        assert torch.equal(tr.x[:, 0], tr.x[:, 0].sort().values)  # the original order is kept
    again = hold_out_validation(numbered(), 0.2, seed=5).validation_stream
    other = hold_out_validation(numbered(), 0.2, seed=6).validation_stream
    assert [ids(v) for v in again] == [ids(v) for v in b.validation_stream]
    assert [ids(v) for v in other] != [ids(v) for v in b.validation_stream]


def test_small_classes_keep_one_sample_on_each_side():
    b = hold_out_validation(numbered(n_per_class=3), 0.01, seed=0)
    for tr, va in zip(b.train_stream, b.validation_stream, strict=True):
        for c in tr.classes:
            assert int((va.y == c).sum()) == 1 and int((tr.y == c).sum()) == 2


def test_validation_zero_changes_nothing_and_out_of_range_is_one_line():
    b = synthetic(validation=0.0)
    assert b.validation_stream == [] and [len(e) for e in b.train_stream] == [400] * 5
    with pytest.raises(ValueError, match=r"benchmark.validation=1.0 .*\[0, 1\)"):
        synthetic(validation=1.0)
    with pytest.raises(ConfigError, match="benchmark.validation=-0.1"):
        validate(make_cfg("benchmark=synthetic", "benchmark.validation=-0.1"))


def test_online_stream_streams_only_what_validation_leaves():
    b = online_stream(hold_out_validation(numbered(), 0.2, seed=0), batch_size=7, seed=0)
    held = set().union(*(ids(v) for v in b.validation_stream))
    streamed = set().union(*(ids(m) for m in b.train_stream))
    assert held.isdisjoint(streamed) and len(held) + len(streamed) == 180


@pytest.mark.slow
def test_experiences_that_share_their_images_share_the_split():
    """Permuted MNIST's experiences hold one copy of MNIST: the split keeps it one copy (one
    for training, one for validation), and every experience holds out the same images."""
    b = permuted_mnist(n_experiences=3, validation=0.1)
    train = {ex.x.data_ptr() for ex in b.train_stream}
    held = {v.x.data_ptr() for v in b.validation_stream}
    assert len(train) == len(held) == 1 and train != held
    n = [len(v) for v in b.validation_stream]
    assert n[0] == n[1] == n[2] and abs(n[0] - 6000) <= 10  # per-class rounding


def test_runner_writes_the_validation_and_task_il_matrices(run_debug):
    summary, run_dir = run_debug("strategy=replay", "benchmark.validation=0.25")
    V = np.loadtxt(run_dir / "val_acc_matrix.csv", delimiter=",", skiprows=1)
    A = np.loadtxt(run_dir / "task_acc_matrix.csv", delimiter=",", skiprows=1)
    R = np.loadtxt(run_dir / "acc_matrix.csv", delimiter=",", skiprows=1)
    assert V.shape == A.shape == R.shape == (5, 5)
    assert summary["val_final_avg_acc"] == pytest.approx(V[-1].mean(), abs=1e-6)
    assert summary["task_final_avg_acc"] == pytest.approx(A[-1].mean(), abs=1e-6)
    assert (A >= R - 1e-9).all()  # fewer choices: never less accurate than class-IL
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["stream"] == "validation"]
    assert len(val) == len(rows) - len(val) == 6 * 5  # untrained + 5 experiences, 5 columns
    assert {r["n"] for r in val} == {100}  # 25% of 2 classes × 200 training samples
    assert "validation" in closing_lines(summary, run_dir)


def test_no_task_structure_no_task_il():
    assert synthetic(scenario="domain").task_classes is None
    assert synthetic().task_classes == [ex.classes for ex in synthetic().test_stream]


def test_task_il_accuracy_is_the_masked_argmax():
    """Hand computation: logits restricted to each sample's experience classes."""
    from clrun.components import Components, RunState
    from clrun.run import evaluate

    b = synthetic(n_experiences=5, test_per_class=7)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, t=None):
            return self.net(x)

    state = RunState(Model(), b, torch.device("cpu"), batch_size=8)
    results = evaluate(state, Components({}), batch_size=9)  # batches cut across nothing special
    for exp, r in zip(b.test_stream, results, strict=True):
        logits = model(b.prepare(exp.x, exp.e)).detach().numpy()
        own = exp.classes
        y = exp.y.numpy()
        masked = np.full_like(logits, -np.inf)
        masked[:, own] = logits[:, own]
        assert r["task_acc"] == pytest.approx((masked.argmax(1) == y).mean())
        assert r["acc"] == pytest.approx((logits.argmax(1) == y).mean())


def test_optimize_names_the_returned_metric():
    assert objective(make_cfg("benchmark=synthetic")) == "final_avg_acc"
    assert objective(make_cfg("benchmark.validation=0.1")) == "val_final_avg_acc"
    assert objective(make_cfg("benchmark.validation=0.1", "optimize=forgetting")) == "forgetting"
    with pytest.raises(ConfigError, match="optimize=val_bwt needs a validation split"):
        validate(make_cfg("benchmark=synthetic", "optimize=val_bwt"))
    with pytest.raises(ConfigError, match=r"optimize='accuracy' .*val_final_avg_acc"):
        validate(make_cfg("optimize=accuracy"))
    with pytest.raises(ConfigError, match="no task structure"):
        check_objective(make_cfg("optimize=task_final_avg_acc"), synthetic(scenario="domain"))
    check_objective(make_cfg("optimize=task_final_avg_acc"), synthetic())


def test_optuna_on_a_test_metric_warns(capsys):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_dir

    from clrun.cli import _warn_test_set_tuning
    from clrun.cli import config_dir as conf

    with initialize_config_dir(str(conf()), version_base="1.3"):
        tuned = compose("config", ["hparams_search=replay_lr"], return_hydra_config=True)
        on_test = compose(
            "config",
            ["hparams_search=replay_lr", "benchmark.validation=0", "optimize=null"],
            return_hydra_config=True,
        )
    assert tuned.benchmark.validation == 0.1 and tuned.optimize == "val_final_avg_acc"
    _warn_test_set_tuning(tuned)
    assert capsys.readouterr().err == ""
    _warn_test_set_tuning(on_test)
    assert "tuned on the test set" in capsys.readouterr().err
