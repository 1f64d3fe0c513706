"""clrun from Python: ``compose`` is the CLI's composition and validation, ``run`` writes a run
directory like the CLI's, ``load_run`` gives back the model that scored the accuracy matrix
(final, or after each experience with ``checkpoint.keep=every_experience``), and the README's
"Use from Python" example runs as shown."""

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, clrun, compose_with_choices
from omegaconf import OmegaConf, open_dict

import clrun as api
from clrun import checkpoint
from clrun.errors import ConfigError, OutputError


def test_import_loads_no_torch_and_clrun_run_is_callable_in_any_import_order():
    script = textwrap.dedent(
        """
        import sys
        import clrun
        assert "torch" not in sys.modules and "hydra" not in sys.modules, "heavy import"
        {first}
        from clrun import run
        import clrun.run
        from clrun.run import evaluate, train
        assert callable(run) and callable(clrun.run) and clrun.run.train is train
        print("ok")
        """
    )
    for first in ("pass", "from clrun.run import train", "import clrun.run"):
        p = subprocess.run(
            [sys.executable, "-c", script.format(first=first)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert p.stdout.strip() == "ok", (first, p.stderr)


OVERRIDES = ["debug=default", "strategy=lwf", "optimizer.lr=0.01", "model.head=incremental"]


def test_compose_is_the_clis_composition(tmp_path):
    cfg = api.compose(OVERRIDES)
    printed = clrun("--cfg", "job", *OVERRIDES, cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    job = OmegaConf.to_container(cfg, resolve=True)
    del job["hydra"]
    assert job == OmegaConf.to_container(OmegaConf.create(printed.stdout), resolve=True)
    _, choices = compose_with_choices(*OVERRIDES)
    assert dict(cfg.hydra.runtime.choices) == choices
    assert list(cfg.hydra.overrides.task) == OVERRIDES


@pytest.mark.parametrize(
    "override,message",
    [
        ("optimizer.lr=-1", "optimizer.lr=-1 is not allowed: expected a finite number > 0"),
        ("strategy.epochz=3", "unknown key 'epochz' in strategy; allowed: "),
        ("strategy=nope", "Could not find 'strategy/nope'"),
        ("checkpoint.keep=always", "expected one of last | every_experience"),
    ],
)
def test_compose_raises_the_one_line_config_error(override, message):
    with pytest.raises(ConfigError) as e:
        api.compose(["debug=default", override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_compose_with_a_users_config_dir(tmp_path):
    confs = tmp_path / "myconf" / "strategy"
    confs.mkdir(parents=True)
    (confs / "short_naive.yaml").write_text("defaults:\n  - naive\n  - _self_\nepochs: 1\n")
    cfg = api.compose(["strategy=short_naive"], config_dir=tmp_path / "myconf")
    assert cfg.strategy.epochs == 1 and cfg.hydra.runtime.choices.strategy == "short_naive"
    with pytest.raises(ConfigError, match="Could not find 'strategy/short_naive'"):
        api.compose(["strategy=short_naive"])  # not without the folder
    with pytest.raises(ConfigError, match="no such folder"):
        api.compose([], config_dir=tmp_path / "missing")


def test_run_writes_a_self_describing_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = api.compose(["debug=default", "strategy=replay", "buffer.max_size=50"])
    summary = api.run(cfg)
    from clrun import run  # the same function, by its other spelling

    again = run(cfg)
    first, second = sorted((tmp_path / "outputs").glob("*/*"))  # two fresh directories
    assert summary["status"] == again["status"] == "completed"
    assert (summary["strategy"], summary["benchmark"], summary["model"]) == (
        "replay",
        "synthetic",
        "mlp",
    )
    assert summary["buffer"] == "reservoir"
    assert summary["overrides"] == ["debug=default", "strategy=replay", "buffer.max_size=50"]
    assert json.loads((first / "summary.json").read_text()) == summary
    saved = OmegaConf.load(first / ".hydra" / "config.yaml")
    with open_dict(cfg):
        del cfg["hydra"]
    assert saved == cfg
    assert OmegaConf.load(first / ".hydra" / "overrides.yaml") == summary["overrides"]
    assert "experience 5/5" in (first / "run.log").read_text()
    assert (first / "acc_matrix.csv").read_text() == (second / "acc_matrix.csv").read_text()


def test_run_refuses_a_bad_edit_before_writing_anything(tmp_path):
    cfg = api.compose(["debug=default"])
    cfg.strategy.batch_size = 0
    with pytest.raises(ConfigError, match="strategy.batch_size=0"):
        api.run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot write the run directory"):
        api.run(api.compose(["debug=default"]), tmp_path / "file" / "run")
    with pytest.raises(OutputError, match="it is a file"):
        api.run(api.compose(["debug=default"]), tmp_path / "file")


def rows(run_dir: Path) -> dict[int, list[float]]:
    """Row i of the accuracy matrix from metrics.jsonl: the exact values evaluation gave."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["trained_through"] >= 0 and r.get("stream", "test") == "test" and "event" not in r:
            out.setdefault(r["trained_through"], []).append(r["acc"])
    return out


@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=naive", "model.head=incremental", "strategy.iterations=2"),
        ("strategy=icarl",),  # nearest-mean predictions: the components are restored too
        ("strategy=replay", "model.head=multi", "benchmark.scenario=task"),
    ],
    ids=["incremental_head", "icarl", "multi_head"],
)
def test_load_run_reproduces_the_final_row_exactly(tmp_path, overrides):
    cfg = api.compose(["debug=default", *overrides])
    summary = api.run(cfg, tmp_path / "run")
    loaded = api.load_run(tmp_path / "run")
    assert loaded.summary == summary and loaded.experience == 4
    assert loaded.config == OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml")
    assert loaded.acc_matrix.shape == (5, 5) and loaded.val_acc_matrix is None
    assert not loaded.model.training
    state = torch.get_rng_state()
    assert loaded.evaluate() == rows(tmp_path / "run")[4]
    assert torch.equal(torch.get_rng_state(), state)  # building the benchmark drew nothing
    assert loaded.evaluate() == pytest.approx(loaded.acc_matrix[-1].tolist(), abs=5e-7)
    bench = loaded.benchmark()
    exp = bench.test_stream[0]
    with torch.no_grad():
        logits = loaded.model(bench.prepare(exp.x, exp.e), exp.t)
    assert logits.shape == (len(exp), bench.n_classes)


class _Stop(Exception):
    pass


def test_every_experience_keeps_each_model_and_resume_stays_bit_identical(tmp_path, monkeypatch):
    overrides = ["debug=default", "model.head=incremental", "checkpoint.keep=every_experience"]
    cfg = api.compose([*overrides, "checkpoint.every_n_steps=10"])
    api.run(cfg, tmp_path / "full")
    exact = rows(tmp_path / "full")
    with pytest.raises(ConfigError, match=r"kept the models after experiences \[0, 1, 2, 3, 4\]"):
        api.load_run(tmp_path / "full", experience=5)
    for i in range(5):
        loaded = api.load_run(tmp_path / "full", experience=i)
        assert loaded.experience == i and loaded.components is None
        assert loaded.evaluate() == exact[i], i
        assert loaded.model.head.units.linear.out_features == 2 * (i + 1)  # the grown head

    # stopped inside experience 2, then resumed: the same rows and the same kept models
    save = checkpoint.save

    def save_then_stop(run_dir, state):
        save(run_dir, state)
        if state["step"] == 60:  # 26 steps per experience, a checkpoint every 10
            raise _Stop

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    with pytest.raises(_Stop):
        api.run(cfg, tmp_path / "resumed")
    monkeypatch.setattr(checkpoint, "save", save)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoint").glob("*.pt")) == [
        "model_exp0.pt",
        "model_exp1.pt",
        "state.pt",
    ]
    summary = api.run(cfg, tmp_path / "resumed")
    assert summary["status"] == "completed"
    for name in ("acc_matrix.csv", "metrics.jsonl"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "full" / name).read_text()
    for i in range(5):
        a = torch.load(checkpoint.model_file(tmp_path / "full", i), weights_only=True)["model"]
        b = torch.load(checkpoint.model_file(tmp_path / "resumed", i), weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i


def test_an_experience_that_was_not_kept_is_a_one_line_error(tmp_path):
    api.run(api.compose(["debug=default", "strategy.epochs=1"]), tmp_path / "run")
    assert not list((tmp_path / "run" / "checkpoint").glob("model_exp*"))
    with pytest.raises(ConfigError, match="keep=last: run with checkpoint.keep=every_experience"):
        api.load_run(tmp_path / "run", experience=2)
    with pytest.raises(ConfigError, match="not a clrun run directory"):
        api.load_run(tmp_path)


def test_the_readme_example_runs_as_shown(tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "replay" in printed and (tmp_path / "outputs" / "replay" / "summary.json").exists()
