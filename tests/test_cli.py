"""The command line as a user types it: errors, help, user config folders, multirun."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import assert_learned, clrun

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "override,expected",
    [
        ("strategy.epochz=2", ["strategy.epochz", "epochs"]),
        ("optimizer.lr=abc", ["optimizer.lr", "abc", "number > 0"]),
        ("strategy=nope", ["strategy/nope", "naive", "replay"]),
        ("buffer.max_size=-1", ["buffer.max_size", "-1", "≥ 1"]),
        ("optimizer.lr=0", ["optimizer.lr", "0", "> 0"]),
        ("optimizer.lr=nan", ["optimizer.lr", "nan", "finite"]),
        ("strategy.epochs=0", ["strategy.epochs", "0", "≥ 1"]),
        ("benchmark.scenario=klass", ["benchmark.scenario", "klass", "class | task | domain"]),
        ("model.head=double", ["model.head", "double", "single"]),
        ("benchmark.n_experiences=3", ["benchmark.n_experiences=3", "divide"]),
        ("benchmark.class_order=[]", ["benchmark.class_order", "empty"]),
        ("benchmark.class_order=[0,0,1,2,3,4,5,6,7,8]", ["benchmark.class_order", "repeats"]),
        ("benchmark.class_order=[0,1,2,3,4,5,6,7,8,99]", ["benchmark.class_order", "99"]),
        ("benchmark.class_order=random", ["benchmark.class_order", "random", "vandeven"]),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, override, expected):
    p = clrun("debug=default", override, f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    for text in expected:
        assert text in p.stderr, (text, p.stderr)
    if (tmp_path / "summary.json").exists():
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["status"] == "failed"
        assert not (tmp_path / "checkpoint").exists()  # no training happened


def test_replay_without_buffer_is_a_clear_error(tmp_path):
    p = clrun(
        "debug=default", "strategy=replay", "buffer=none", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert p.returncode == 2 and "needs a buffer" in p.stderr and "Traceback" not in p.stderr


def test_lwf_rejects_non_positive_hyperparameters(tmp_path):
    for override in ("strategy.alpha=0", "strategy.temperature=-1"):
        p = clrun(
            "debug=default", "strategy=lwf", override, f"hydra.run.dir={tmp_path}", cwd=tmp_path
        )
        assert p.returncode == 2 and override.split("=")[0] in p.stderr, p.stderr


def test_help_lists_groups_and_options(tmp_path):
    p = clrun("--help", cwd=tmp_path)
    assert p.returncode == 0
    for text in ("benchmark:", "strategy:", "split_mnist", "replay_lwf", "class_balanced", "adamw"):
        assert text in p.stdout, text


def test_user_config_dir_and_own_component(tmp_path):
    """A method from the user's own package + YAML, composed with ours via --config-dir."""
    pkg = tmp_path / "mylab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            import torch

            class L2Anchor:
                '''Pull the weights towards their values after the previous experience.'''
                def __init__(self, strength: float = 1.0):
                    self.strength, self.anchor = strength, None

                def post_update(self, state, exp):
                    self.anchor = [p.detach().clone() for p in state.model.parameters()]

                def penalty(self, state, batch, x, out):
                    if self.anchor is None:
                        return None
                    params = state.model.parameters()
                    return self.strength * sum(((p - a) ** 2).sum() for p, a in zip(params, self.anchor))
            """
        )
    )
    confs = tmp_path / "myconf" / "strategy"
    confs.mkdir(parents=True)
    (confs / "l2_replay.yaml").write_text(
        textwrap.dedent(
            """
            # Replay plus my own L2 anchor.
            defaults:
              - replay
              - _self_
            components:
              anchor:
                _target_: mylab.L2Anchor
                strength: 0.01
            """
        )
    )
    run_dir = tmp_path / "run"
    p = clrun(
        "--config-dir",
        str(tmp_path / "myconf"),
        "debug=default",
        "strategy=l2_replay",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert p.returncode == 0, p.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["strategy"] == "l2_replay"
    assert_learned(run_dir)


@pytest.mark.slow
def test_multirun_basic_launcher_one_dir_per_job(tmp_path):
    p = clrun(
        "-m",
        "debug=default",
        "strategy=naive,replay",
        "seed=0,1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    summaries = sorted((tmp_path / "sweep").glob("*/summary.json"))
    assert len(summaries) == 4
    assert all(json.loads(s.read_text())["status"] == "completed" for s in summaries)
    for s in summaries:
        assert_learned(s.parent)


@pytest.mark.slow
def test_installed_wheel_finds_its_configs_from_any_directory(tmp_path):
    """Build a wheel, install it in a fresh venv (reusing this environment's packages), and run
    `clrun --cfg job` from an unrelated directory."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    wheel = next(dist.glob("clrun-*.whl"))
    subprocess.run(
        [py, "-m", "pip", "install", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(
        [venv / "bin" / "clrun", "--cfg", "job", "strategy=replay_lwf"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "clrun.strategies.LwF" in p.stdout and "clrun.strategies.Replay" in p.stdout
    where = subprocess.run(
        [py, "-c", "import clrun; print(clrun.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    assert str(venv) in where
