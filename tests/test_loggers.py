"""Loggers: TensorBoard and MLflow receive per-step losses, per-experience accuracies and the
final metrics; a missing package is a clear error; no logger means no calls at all."""

import pytest

from clrun.loggers import NoLogger, _require


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
        float((run_dir / "acc_matrix.csv").read_text().splitlines()[-1].split(",")[4]), abs=1e-6
    )
    assert "acc_matrix" in events.Tags()["images"]


def test_mlflow_logger_records_params_metrics_and_artifacts(run_debug, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason='pip install -e ".[loggers]"')
    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary, run_dir = run_debug("logger=mlflow", f"logger.tracking_uri={uri}", "seed=3")
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("clrun").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "3" and run.data.params["strategy.batch_size"] == "32"
    assert run.data.metrics["final_avg_acc"] == pytest.approx(summary["final_avg_acc"])
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == summary["steps"]
    assert len(client.get_metric_history(run.info.run_id, "average_seen_acc")) == 5
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "acc_matrix.csv", "acc_matrix.png"} <= artifacts


def test_a_missing_logger_package_is_a_clear_error():
    with pytest.raises(ValueError, match=r"logger=tensorbored needs .*pip install"):
        _require("tensorbored_missing_module", "tensorbored")


def test_no_logger_is_a_no_op(run_debug, monkeypatch):
    """Without logger=..., the runner calls a NoLogger at every hook; it returns nothing and
    writes nothing beside the run directory's own files."""
    import clrun.run

    calls = []

    class Recording(NoLogger):
        def log_steps(self, *args):
            calls.append("log_steps")
            return super().log_steps(*args)

        def log_experience(self, *args):
            calls.append("log_experience")
            return super().log_experience(*args)

        def close(self, *args):
            calls.append("close")
            return super().close(*args)

    assert NoLogger().log_steps(0, None) is None and NoLogger().close({}) is None
    monkeypatch.setattr(clrun.run, "NoLogger", Recording)
    summary, run_dir = run_debug("strategy.iterations=2")
    assert summary["status"] == "completed"
    assert calls.count("log_experience") == 5 and calls[-1] == "close", calls
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "mlflow.db").exists()
