"""Loggers: TensorBoard, MLflow and W&B receive per-step losses, per-experience accuracies (test,
validation, task-IL) and the final metrics; several compose in one run; a missing package is a
clear error; no logger means no calls at all. ``train.csv`` is written by every run."""

import csv
import json
import math
import struct
import sys
from pathlib import Path

import pytest
from conftest import make_cfg

from clrun.config import ConfigError, build, validate
from clrun.loggers import (
    Loggers,
    NoLogger,
    TensorBoardLogger,
    WandbLogger,
    _require,
    experience_metrics,
    logger_nodes,
    mlflow_name,
)

KILLER = ("+strategy.components.zkill._target_=killer.KillAt", "checkpoint.every_n_steps=4")


@pytest.fixture
def offline_wandb(monkeypatch, tmp_path):
    """W&B without network, console capture, system metrics, or files outside ``tmp_path``."""
    pytest.importorskip("wandb", reason='pip install -e ".[wandb]"')
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }.items():
        monkeypatch.setenv(name, value)


def _wandb_log(path: Path) -> list:
    """Every complete record of the ``.wandb`` file at ``path``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = chunk if kind in (1, 2) else chunks + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            records.append(pb.Record.FromString(chunks))
    return records


def wandb_records(wandb_dir: Path) -> dict:
    """What an offline W&B run wrote, read back from its ``.wandb`` file (a LevelDB-style log:
    32 KiB blocks of records, each a 7-byte header then a chunk of a protobuf ``Record``):
    ``run`` (name, group, tags, config), ``history`` (one dict per ``log`` call) and
    ``summary`` (the last value of each key written to the summary). W&B's service process may
    still be writing when ``finish()`` returns on a busy machine: read until the run's ``exit``
    record is there (at most 60 s)."""
    import time

    (path,) = Path(wandb_dir).glob("wandb/offline-run-*/*.wandb")
    for _ in range(120):
        records = _wandb_log(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.5)
    out: dict = {"history": [], "summary": {}}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            out["config"] = {c.key: json.loads(c.value_json) for c in r.run.config.update}
        elif kind == "history":
            out["history"].append(
                {h.key or "/".join(h.nested_key): json.loads(h.value_json) for h in r.history.item}
            )
        elif kind == "summary":
            out["summary"].update({s.key: json.loads(s.value_json) for s in r.summary.update})
    return out


def acc_matrix(run_dir: Path) -> list[list[float]]:
    rows = (run_dir / "acc_matrix.csv").read_text().splitlines()[1:]
    return [[float(a) for a in row.split(",")] for row in rows]


def test_tensorboard_logger_writes_steps_experiences_and_hparams(run_debug):
    pytest.importorskip("tensorboard", reason='pip install -e ".[loggers]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, run_dir = run_debug("logger=tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert len(events.Scalars("train/loss")) == summary["steps"]
    seen = events.Scalars("accuracy/average_seen")
    assert [e.step for e in seen] == [0, 1, 2, 3, 4]
    assert events.Scalars("accuracy/exp4")[-1].value == pytest.approx(
        acc_matrix(run_dir)[-1][4], abs=1e-6
    )
    assert "acc_matrix" in events.Tags()["images"]


def test_mlflow_logger_records_params_metrics_and_artifacts(run_debug, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason='pip install -e ".[loggers]"')
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary, run_dir = run_debug("logger=mlflow", f"logger.mlflow.tracking_uri={uri}", "seed=3")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("clrun").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "3" and run.data.params["strategy.batch_size"] == "32"
    assert run.data.metrics["final_avg_acc"] == pytest.approx(summary["final_avg_acc"])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == summary["steps"]
    assert len(client.get_metric_history(run.info.run_id, "average_seen_acc")) == 5
    assert run.data.metrics["acc_exp4"] == pytest.approx(acc_matrix(run_dir)[-1][4], abs=1e-6)
    assert {"test_loss_exp0", "train_s", "eval_s"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "acc_matrix.csv", "acc_matrix.png", "train.csv"} <= artifacts


def test_wandb_offline_run_holds_the_config_every_metric_the_summary_and_the_plots(
    run_debug, offline_wandb
):
    summary, run_dir = run_debug(
        "logger=wandb", "logger.wandb.mode=offline", "logger.wandb.group=g", "seed=3"
    )
    wb = wandb_records(run_dir)
    assert wb["run"].display_name == run_dir.name and wb["run"].run_group == "g"
    assert wb["config"]["seed"] == 3 and wb["config"]["strategy.batch_size"] == 32
    steps = [h for h in wb["history"] if "train/loss" in h]
    assert [h["train/step"] for h in steps] == list(range(1, summary["steps"] + 1))
    experiences = [h for h in wb["history"] if "experience" in h]
    assert [h["experience"] for h in experiences] == [0, 1, 2, 3, 4]
    R = acc_matrix(run_dir)
    for i, h in enumerate(experiences):
        assert [h[f"accuracy/exp{j}"] for j in range(5)] == pytest.approx(R[i], abs=1e-6)
        assert h["accuracy/average_seen"] == pytest.approx(sum(R[i][: i + 1]) / (i + 1), abs=1e-6)
        assert {"test_loss/exp0", "time/train_s", "time/eval_s"} <= set(h)
    assert wb["summary"]["final_avg_acc"] == pytest.approx(summary["final_avg_acc"])
    assert wb["summary"]["forgetting"] == pytest.approx(summary["forgetting"])
    assert wb["summary"]["status"] == "completed"
    images = {k.split("/")[1] for h in wb["history"] for k in h if k.startswith("plots/")}
    assert images == {"acc_matrix", "acc_curve"}


def test_wandb_logs_validation_and_task_il_accuracy_and_their_final_metrics(
    tmp_path, offline_wandb
):
    """The runner's validation and task-IL results reach W&B (and the summary's ``val_`` and
    ``task_`` fields its summary), without a run: the logger driven by hand."""
    logger = WandbLogger(str(tmp_path), {"seed": 1}, tags=["a", "b"], mode="offline")
    results = [{"acc": 0.5, "loss": 1.0, "n": 4, "task_acc": 0.75}] * 2
    validation = [{"acc": 0.25, "loss": 2.0, "n": 2, "task_acc": 1.0}, *results[1:]]
    logger.log_experience(0, results, {"train_s": 1.0, "eval_s": 0.1}, None, validation)
    summary = {"status": "completed", "final_avg_acc": 0.5, "val_final_avg_acc": 0.4}
    logger.close({**summary, "task_final_avg_acc": 0.7, "task_forgetting": None})
    wb = wandb_records(tmp_path)
    assert list(wb["run"].tags) == ["a", "b"]
    (h,) = (h for h in wb["history"] if "experience" in h)
    assert h["task_accuracy/exp0"] == 0.75 and h["val_accuracy/exp0"] == 0.25
    assert h["val_accuracy/average_seen"] == 0.25 and h["val_task_accuracy/exp0"] == 1.0
    assert h["val_loss/exp0"] == 2.0
    assert wb["summary"]["val_final_avg_acc"] == 0.4 and wb["summary"]["task_final_avg_acc"] == 0.7
    assert "task_forgetting" not in wb["summary"]


def test_experience_metrics_name_test_validation_and_task_il_results():
    results = [{"acc": 1.0, "loss": 0.1, "n": 2, "task_acc": 1.0}, {"acc": 0.0, "loss": 3.0}]
    results[1]["task_acc"] = 0.5
    timing = {"train_s": 2.0, "eval_s": 0.5}
    m = experience_metrics(0, results, timing)
    assert m["accuracy/average_seen"] == 1.0 and m["accuracy/exp1"] == 0.0
    assert m["task_accuracy/exp1"] == 0.5 and m["task_accuracy/average_seen"] == 1.0
    assert m["test_loss/exp1"] == 3.0 and m["time/train_s"] == 2.0
    assert not any(k.startswith("val_") for k in m)
    no_tasks = [{**r, "task_acc": None} for r in results]
    m = experience_metrics(1, results, timing, validation=no_tasks)
    assert m["accuracy/average_seen"] == 0.5 and m["val_accuracy/average_seen"] == 0.5
    assert m["val_loss/exp0"] == 0.1 and "val_task_accuracy/exp0" not in m
    assert [mlflow_name(k) for k in ("accuracy/exp0", "val_accuracy/average_seen")] == [
        "acc_exp0",
        "average_seen_val_acc",
    ]
    assert mlflow_name("time/eval_s") == "eval_s"
    assert mlflow_name("task_accuracy/average_seen") == "average_seen_task_acc"


def test_tensorboard_logs_validation_and_task_il_accuracy(tmp_path):
    pytest.importorskip("tensorboard", reason='pip install -e ".[loggers]"')
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), {"seed": 0})
    results = [{"acc": 0.5, "loss": 1.0, "n": 4, "task_acc": 0.75}]
    logger.log_experience(0, results, {"train_s": 1, "eval_s": 1}, np.ones((1, 1)), results)
    logger.close({"status": "completed", "final_avg_acc": 0.5, "val_final_avg_acc": 0.5})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"task_accuracy/exp0", "val_accuracy/average_seen", "val_task_accuracy/exp0"} <= tags


def test_several_loggers_in_one_run_each_write_their_files(run_debug, offline_wandb):
    pytest.importorskip("tensorboard", reason='pip install -e ".[loggers]"')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, run_dir = run_debug("logger=[tensorboard,wandb]", "logger.wandb.mode=offline")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert len(events.Scalars("train/loss")) == summary["steps"]
    wb = wandb_records(run_dir)
    assert [h["experience"] for h in wb["history"] if "experience" in h] == [0, 1, 2, 3, 4]
    assert wb["summary"]["final_avg_acc"] == pytest.approx(summary["final_avg_acc"])


def test_logger_options_compose_one_or_several_and_are_validated():
    cfg = make_cfg("logger=[tensorboard,mlflow]")
    validate(cfg)
    assert list(logger_nodes(cfg.logger)) == ["logger.tensorboard", "logger.mlflow"]
    assert list(logger_nodes(make_cfg("logger=tensorboard").logger)) == ["logger.tensorboard"]
    assert logger_nodes(make_cfg().get("logger")) == {}
    with pytest.raises(ConfigError, match=r"logger\.wandb\.mode='online2'.*offline"):
        validate(make_cfg("logger=wandb", "logger.wandb.mode=online2"))
    with pytest.raises(ConfigError, match=r"did you mean logger\.wandb\.project\?"):
        validate(make_cfg("logger=wandb", "+logger.wandb.projct=x"))


def test_loggers_call_each_logger_and_close_all_once_even_if_one_fails():
    calls = []

    class Failing(NoLogger):
        def close(self, summary):
            calls.append("failing.close")
            raise OSError("disk full")

    class Recording(NoLogger):
        def log_experience(self, i, results, timing, acc_matrix, validation=None):
            calls.append(("log_experience", i, validation))

        def close(self, summary):
            calls.append("recording.close")

    class WithoutValidation(NoLogger):  # a logger written before validation results existed
        def log_experience(self, i, results, timing, acc_matrix):
            calls.append(("old log_experience", i))

    Loggers([Recording(), WithoutValidation()]).log_experience(1, [], {}, None)
    loggers = Loggers([Failing(), Recording()])
    loggers.log_experience(2, [], {}, None, validation=[{"acc": 1.0}])
    assert calls == [
        ("log_experience", 1, None),
        ("old log_experience", 1),
        ("log_experience", 2, [{"acc": 1.0}]),
    ]
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        loggers.close({})
    loggers.close({})  # the runner's failure path closes again: nothing happens
    assert calls == ["failing.close", "recording.close"]


def test_a_missing_logger_package_is_a_clear_error():
    with pytest.raises(ValueError, match=r"logger\.tensorbored needs .*pip install"):
        _require("tensorbored_missing_module", "tensorbored")


def test_logger_wandb_without_wandb_is_a_one_line_error_naming_the_extra(run_debug, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError) as e:
        run_debug("logger=wandb")
    message = str(e.value)
    assert message.startswith("logger.wandb needs wandb") and "\n" not in message
    assert message.endswith('pip install -e ".[wandb]"')
    with pytest.raises(ConfigError, match="logger.wandb needs wandb"):
        build(make_cfg("logger=wandb").logger.wandb, "logger.wandb", run_dir=".", run_config={})


def test_no_logger_is_a_no_op(run_debug, monkeypatch):
    """Without logger=..., the runner calls a NoLogger at every hook; it returns nothing and
    writes nothing beside the run directory's own files."""
    import clrun.run

    calls = []

    class Recording(NoLogger):
        def log_steps(self, *args):
            calls.append("log_steps")
            return super().log_steps(*args)

        def log_experience(self, *args, **kwargs):
            calls.append("log_experience")
            return super().log_experience(*args, **kwargs)

        def close(self, *args):
            calls.append("close")
            return super().close(*args)

    assert NoLogger().log_steps(0, None) is None and NoLogger().close({}) is None
    monkeypatch.setattr(clrun.run, "NoLogger", Recording)
    summary, run_dir = run_debug("strategy.iterations=2")
    assert summary["status"] == "completed"
    assert calls.count("log_experience") == 5 and calls[-1] == "close", calls
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "mlflow.db").exists()
    assert not (run_dir / "wandb").exists()


def read_train_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "train.csv") as f:
        return list(csv.DictReader(f))


def test_train_csv_has_one_row_per_experience_with_steps_losses_and_lr(run_debug, monkeypatch):
    import clrun.run

    losses = []

    class Recording(NoLogger):
        def log_steps(self, first_step, step_losses):
            losses.append(step_losses.tolist())

    monkeypatch.setattr(clrun.run, "NoLogger", Recording)
    cfg = make_cfg("debug=default")
    benchmark = build(cfg.benchmark, "benchmark")
    summary, run_dir = run_debug("optimizer.lr=0.002")
    rows = read_train_csv(run_dir)
    assert list(rows[0]) == [
        *("experience", "steps", "samples", "train_loss_mean", "train_loss_last"),
        *("train_s", "eval_s", "samples_per_s", "lr", "rss_mb", "params"),
    ]
    assert [int(r["experience"]) for r in rows] == [0, 1, 2, 3, 4]
    epochs, bs = cfg.strategy.epochs, cfg.strategy.batch_size
    for r, exp, step_losses in zip(rows, benchmark.train_stream, losses, strict=True):
        assert int(r["steps"]) == epochs * math.ceil(len(exp) / bs)
        assert int(r["samples"]) == epochs * len(exp)
        assert float(r["train_loss_last"]) == step_losses[-1]
        assert float(r["train_loss_mean"]) == pytest.approx(sum(step_losses) / len(step_losses))
        assert float(r["lr"]) == 0.002
        samples_per_s = float(r["samples"]) / float(r["train_s"])
        assert float(r["samples_per_s"]) == pytest.approx(samples_per_s)
        assert float(r["eval_s"]) > 0 and float(r["rss_mb"]) > 0
    assert sum(int(r["steps"]) for r in rows) == summary["steps"]
    # the model's size after each experience: the debug MLP with its single head does not grow
    params = [int(r["params"]) for r in rows]
    assert summary["params_per_experience"] == params
    assert params == [(64 * 400 + 400) + (400 * 400 + 400) + (400 * 10 + 10)] * 5  # 8×8 inputs


def test_train_csv_of_a_resumed_run_equals_the_uninterrupted_one_but_for_times(
    run_debug, tmp_path, monkeypatch
):
    from clrun.preemption import RunInterrupted

    _, ref_dir = run_debug(*KILLER)
    run_dir = tmp_path / "interrupted"
    monkeypatch.setenv("CLRUN_TEST_KILL_AT", "31:SIGTERM")  # inside the second experience
    with pytest.raises(RunInterrupted):
        run_debug(*KILLER, run_dir=run_dir)
    assert len(read_train_csv(run_dir)) == 1
    monkeypatch.delenv("CLRUN_TEST_KILL_AT")
    resumed, _ = run_debug(*KILLER, run_dir=run_dir)
    assert resumed["status"] == "completed"
    measured = ("train_s", "eval_s", "samples_per_s", "rss_mb")
    a, b = read_train_csv(ref_dir), read_train_csv(run_dir)
    assert [{k: v for k, v in r.items() if k not in measured} for r in a] == [
        {k: v for k, v in r.items() if k not in measured} for r in b
    ]
    assert len(b) == 5
