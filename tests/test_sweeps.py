"""Multiruns as a user types them: launchers, resumed sweeps, failing jobs, Optuna, the report.

The multirun tests are slow (each starts clrun, some start worker processes) and need the sweep
extra (`pip install -e ".[sweep]"`); without a plugin its tests are skipped.
"""

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF, clrun
from hydra import compose, initialize_config_dir

from clrun.cli import _job_key

ROOT = Path(__file__).resolve().parents[1]


def summaries(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/summary.json")}


def needs(plugin: str) -> None:
    pytest.importorskip(f"hydra_plugins.{plugin}", reason=f'{plugin}: pip install -e ".[sweep]"')


# --- fast: the pieces ---------------------------------------------------------------------------


def test_job_key_ignores_order_and_run_management_keys():
    a = ["strategy=replay", "seed=1", "resume=true", "threads=2"]
    assert _job_key(a) == _job_key(["seed=1", "strategy=replay", "data_dir=/x"])
    assert _job_key(a) != _job_key(["strategy=replay", "seed=2"])


def test_sweep_outcome_callback_is_registered():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    assert cfg.hydra.callbacks.sweep_outcome._target_ == "clrun.cli.SweepOutcome"


def test_slurm_preset_composes_with_documented_keys():
    needs("hydra_submitit_launcher")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert (launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == (1, 4, 16)
    assert launcher.timeout_min == 120


def test_replay_lr_search_composes():
    needs("hydra_optuna_sweeper")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", ["hparams_search=replay_lr"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"optimizer.lr", "buffer.max_size"}
    assert cfg.hydra.runtime.choices["strategy"] == "replay" and cfg.hydra.mode.name == "MULTIRUN"


# --- slow: real multiruns -----------------------------------------------------------------------

LAUNCHERS = {
    "basic": [],
    # threads=null: the job picks cores // n_jobs itself
    "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "threads=null"],
}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_2x2_sweep_report_and_resume(tmp_path, launcher):
    if launcher == "joblib":
        needs("hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    cmd = ["-m", *LAUNCHERS[launcher], "debug=default", "strategy=naive,replay", "seed=0,1"]
    p = clrun(*cmd, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    runs = summaries(sweep)
    assert sorted(runs) == ["0", "1", "2", "3"]
    assert all(s["status"] == "completed" for s in runs.values())
    assert runs["2"]["overrides"][-2:] == ["strategy=replay", "seed=0"]
    if launcher == "joblib":
        threads = max(1, (os.cpu_count() or 1) // 2)
        assert f"threads={threads}" in (sweep / "0" / "run.log").read_text()

    # The aggregate table: mean and sample std over the two seeds, by hand from the summaries.
    r = subprocess.run(
        [sys.executable, "-m", "clrun.report", str(sweep)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    with open(sweep / "report.csv") as f:
        table = {row["group"].split()[-1]: row for row in csv.DictReader(f)}
    for strategy, jobs in (("strategy=naive", "01"), ("strategy=replay", "23")):
        accs = [runs[j]["final_avg_acc"] for j in jobs]
        assert float(table[strategy]["final_avg_acc_mean"]) == pytest.approx(statistics.mean(accs))
        assert float(table[strategy]["final_avg_acc_std"]) == pytest.approx(statistics.stdev(accs))
        assert table[strategy]["n"] == "2"

    # Again into the same sweep dir: completed jobs are skipped, a deleted one runs again.
    (sweep / "2" / "summary.json").unlink()
    mtimes = {j: (sweep / j / "summary.json").stat().st_mtime_ns for j in "013"}
    p = clrun(*cmd, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("skipped") == 3, p.stdout
    assert {j: (sweep / j / "summary.json").stat().st_mtime_ns for j in "013"} == mtimes
    assert summaries(sweep)["2"]["status"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_failing_jobs_are_recorded_and_the_others_finish(tmp_path, launcher):
    """lr=0 is a config error (before training), lr=1e30 diverges at run time (NaN loss)."""
    if launcher == "joblib":
        needs("hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    p = clrun(
        "-m",
        *LAUNCHERS[launcher],
        "debug=default",
        "optimizer=sgd",
        "optimizer.lr=0,0.01,1e30",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert p.returncode == 1, p.stderr
    runs = summaries(sweep)
    assert [runs[j]["status"] for j in "012"] == ["failed", "completed", "failed"]
    assert runs["0"]["error"].startswith("ConfigError: optimizer.lr=0")
    assert runs["2"]["error"].startswith("TrainingDiverged")
    assert "2 of 3 runs" in p.stderr and f"{sweep / '2'}: failed: TrainingDiverged" in p.stderr

    r = subprocess.run(
        [sys.executable, "-m", "clrun.report", str(sweep)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    section = r.stdout.split("## Runs that did not complete")[1]
    assert "ConfigError" in section and "TrainingDiverged" in section


@pytest.mark.slow
def test_a_stopped_sweep_continues_with_the_same_command(tmp_path):
    """SIGTERM in job 0 (tests/killer.py) stops the sweep with status 3 after a checkpoint; the
    same command again resumes job 0 from its checkpoint and runs job 1."""
    sweep = tmp_path / "sweep"
    cmd = ["-m", "debug=default", "+strategy.components.zkill._target_=killer.KillAt"]
    cmd += ["checkpoint.every_n_steps=4", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    p = clrun(*cmd, cwd=tmp_path, env={"CLRUN_TEST_KILL_AT": "31:SIGTERM"})
    assert p.returncode == 3, p.stderr
    assert "checkpoint saved" in p.stderr and "Traceback" not in p.stderr
    assert summaries(sweep) == {"0": summaries(sweep)["0"]}
    assert summaries(sweep)["0"]["status"] == "interrupted"
    p = clrun(*cmd, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "resumed from checkpoint" in p.stdout
    assert [s["status"] for _, s in sorted(summaries(sweep).items())] == ["completed"] * 2


@pytest.mark.slow
def test_submitit_local_runs_a_job(tmp_path):
    needs("hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    p = clrun(
        "-m",
        "hydra/launcher=submitit_local",
        "debug=default",
        "seed=3",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert summaries(sweep)["0"]["status"] == "completed"
    assert summaries(sweep)["0"]["seed"] == 3


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # optuna 2.10 on SQLAlchemy 1.4
def test_optuna_study_resumes_from_sqlite(tmp_path):
    needs("hydra_optuna_sweeper")
    import optuna

    db = f"sqlite:///{tmp_path / 'study.db'}"
    args = ["hparams_search=replay_lr", "debug=default", f"hydra.sweeper.storage={db}"]
    for n_trials, sweep in ((3, "first"), (2, "second")):
        p = clrun(
            *args, f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweep.dir={sweep}", cwd=tmp_path
        )
        assert p.returncode == 0, p.stderr
        runs = summaries(tmp_path / sweep)
        assert len(runs) == n_trials and all(s["status"] == "completed" for s in runs.values())
        assert all(s["strategy"] == "replay" for s in runs.values())
    study = optuna.load_study(study_name="replay_lr", storage=db)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 5
    # each trial's value is its validation accuracy (the preset's optimize), not the test one
    runs = [s for d in ("first", "second") for s in summaries(tmp_path / d).values()]
    assert sorted(t.value for t in study.trials) == pytest.approx(
        sorted(s["val_final_avg_acc"] for s in runs)
    )
    assert study.best_value == pytest.approx(max(s["val_final_avg_acc"] for s in runs))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # optuna 2.10 on SQLAlchemy 1.4
def test_optuna_failed_trial_is_recorded_and_the_study_goes_on(tmp_path):
    """lr is a choice of 0 (a config error) and 0.01; sampler seed 3 draws 0.01, 0.01, 0."""
    needs("hydra_optuna_sweeper")
    import optuna

    db = f"sqlite:///{tmp_path / 'study.db'}"
    p = clrun(
        "hparams_search=replay_lr",
        "debug=default",
        "optimizer.lr=choice(0,0.01)",
        "hydra.sweeper.sampler.seed=3",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweeper.storage={db}",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert p.returncode == 1, p.stderr
    trials = optuna.load_study(study_name="replay_lr", storage=db).trials
    runs = summaries(tmp_path / "sweep")
    assert len(trials) == len(runs) == 3
    for t in trials:
        run = runs[str(t.number)]
        assert t.state.name == ("FAIL" if t.params["optimizer.lr"] == 0 else "COMPLETE")
        assert run["status"] == ("failed" if t.params["optimizer.lr"] == 0 else "completed")
    assert {t.state.name for t in trials} == {"FAIL", "COMPLETE"}


def test_override_check_leaves_optuna_intervals_to_the_sweeper():
    from clrun.cli import _check_override_keys

    assert (
        _check_override_keys(["hparams_search=replay_lr", "optimizer.lr=interval(0.001,0.01)"])
        is None
    )
    message = _check_override_keys(["-m", "optimizer.lrr=choice(0.1,0.2)"])
    assert message and "optimizer.lrr" in message and "Did you mean optimizer.lr?" in message
