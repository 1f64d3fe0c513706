"""How runs end, as a user sees it: known failures are one line with a documented exit status
(clrun.errors), a completed run directory is left as it is, overrides never go silently unused,
and every run closes with its results."""

import json
from pathlib import Path

import pytest
import torch
from conftest import clrun

from clrun import checkpoint, cli
from clrun.components import Components
from clrun.errors import EXIT_CONFIG_ERROR, EXIT_RUN_FAILURE, ConfigError
from clrun.io import write_json


def _one_line_error(p, *texts: str) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("clrun: error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for text in texts:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_a_dataset_that_cannot_be_obtained_is_one_line_and_exit_4(tmp_path):
    p = clrun(
        "debug=default",
        "benchmark=split_cifar10",
        f"data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert p.returncode == EXIT_RUN_FAILURE
    _one_line_error(p, "could not obtain dataset 'cifar10'", "benchmark.path", "run.log")
    log = (tmp_path / "run" / "run.log").read_text()
    assert "Traceback" in log and "sources tried" in log  # the details are in the run's log
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "DatasetUnavailableError" in summary["traceback"]


def test_a_diverging_loss_is_one_line_and_exit_4(tmp_path):
    run_dir = tmp_path / "run"
    p = clrun(
        "debug=default",
        "optimizer=sgd",
        "optimizer.lr=1e8",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert p.returncode == EXIT_RUN_FAILURE
    _one_line_error(p, "the training loss became", "lower optimizer.lr")
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "failed"


def test_a_corrupted_checkpoint_is_one_line_and_exit_4(tmp_path):
    run_dir = tmp_path / "run"
    assert clrun("debug=default", f"hydra.run.dir={run_dir}", cwd=tmp_path).returncode == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    write_json(run_dir / "summary.json", {**summary, "status": "interrupted"})
    with open(run_dir / "checkpoint" / "state.pt", "ab") as f:
        f.write(b"garbage")
    p = clrun("debug=default", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == EXIT_RUN_FAILURE
    _one_line_error(p, "checkpoint is corrupted", "Delete the checkpoint folder")


def test_a_run_directory_that_cannot_be_written_is_one_line_and_exit_4(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    p = clrun("debug=default", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path)
    assert p.returncode == EXIT_RUN_FAILURE
    _one_line_error(p, "cannot write the run directory", "hydra.run.dir=")
    p = clrun(
        "-m",
        "debug=default",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 'a_file' / 's'}",
        cwd=tmp_path,
    )
    assert p.returncode == EXIT_RUN_FAILURE
    _one_line_error(p, "cannot write the run directory", "hydra.sweep.dir=")


def test_a_completed_run_directory_is_left_untouched_unless_resume_false(tmp_path):
    run_dir = tmp_path / "run"
    first = clrun("debug=default", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0
    output = first.stdout + first.stderr
    assert "final average accuracy" in output and str(run_dir) in output  # the closing block
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()}
    again = clrun("debug=default", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 0 and "already holds this completed run" in again.stderr
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files} == files  # not one byte
    assert {p for p in run_dir.rglob("*") if p.is_file()} == set(files)
    # resume=false trains again in place
    fresh = clrun("debug=default", "resume=false", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert fresh.returncode == 0 and "experience 5/5" in fresh.stdout + fresh.stderr
    assert (run_dir / "summary.json").stat().st_mtime_ns != files[run_dir / "summary.json"][0]


def test_times_add_up_over_resumed_processes(run_debug):
    first, run_dir = run_debug("strategy=naive")
    assert first["train_time_s"] <= first["wall_time_s"]
    # the run did not complete (say it was stopped after its last checkpoint): resuming it
    # trains nothing more, and its wall time continues from the first process's
    write_json(run_dir / "summary.json", {**first, "status": "interrupted"})
    saved = checkpoint.load(run_dir, torch.device("cpu"))["recorder"]["wall_time_s"]
    assert first["train_time_s"] + first["eval_time_s"] < saved <= first["wall_time_s"]
    second, _ = run_debug("strategy=naive", run_dir=run_dir)
    assert second["status"] == "completed" and second["steps"] == first["steps"]
    assert second["train_time_s"] == pytest.approx(first["train_time_s"])
    assert second["wall_time_s"] > saved


def test_a_buffer_override_for_a_strategy_with_its_own_memory_names_the_key(tmp_path):
    p = clrun(
        "debug=default",
        "strategy=gdumb",
        "buffer.max_size=4400",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert p.returncode == EXIT_CONFIG_ERROR
    _one_line_error(p, "buffer.max_size=4400", "strategy=gdumb", "strategy.memory_size")


def test_a_buffer_override_for_a_strategy_without_memory_is_reported(run_debug, caplog):
    with caplog.at_level("WARNING", logger="clrun"):
        summary, _ = run_debug("strategy=naive", "buffer.max_size=300")
    assert summary["buffer"] is None and summary["ignored_overrides"] == ["buffer.max_size=300"]
    assert "buffer.max_size=300 has no effect: strategy=naive uses no buffer" in caplog.text


def test_two_loss_providers_are_a_config_error():
    class Loss:
        def loss(self, state, batch, x, out):
            return out.sum()

    with pytest.raises(ConfigError, match=r"a and b both provide loss\(\)"):
        Components({"a": Loss(), "b": Loss()})
    assert Components({"a": Loss()}).provider("loss") is not None
    assert Components({}).provider("predict") is None


def test_a_missing_launcher_plugin_names_the_extra(monkeypatch):
    monkeypatch.setattr(cli, "_importable", lambda module: False)
    message = cli._missing_plugin(["debug=default", "hydra/launcher=joblib"])
    assert "hydra/launcher=joblib" in message and "pip install 'clrun[sweep]'" in message
    assert "hydra_optuna_sweeper" in cli._missing_plugin(["hparams_search=replay_lr"])
    assert cli._missing_plugin(["strategy=lwf"]) is None
    monkeypatch.setattr(cli, "_importable", lambda module: True)
    assert cli._missing_plugin(["hydra/launcher=joblib"]) is None


def test_the_recorded_config_error_has_no_traceback(tmp_path):
    p = clrun("debug=default", "optimizer.lr=0", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert p.returncode == EXIT_CONFIG_ERROR
    summary = json.loads((Path(tmp_path) / "summary.json").read_text())
    assert summary["status"] == "failed" and "traceback" not in summary
