"""Nothing lost: a run killed anywhere resumes to the bit-identical result of an uninterrupted
run; SIGTERM checkpoints and exits cleanly; bad checkpoints and changed configs are refused."""

import json
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import clrun as run_clrun
from conftest import options, strategy_args

from clrun.checkpoint import CheckpointError
from clrun.io import write_json

ROOT = Path(__file__).resolve().parents[1]
KILLER = ("+strategy.components.zkill._target_=killer.KillAt", "checkpoint.every_n_steps=4")


def clrun(*args: str, cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return run_clrun(*args, cwd=cwd, env={"CLRUN_TEST_KILL_AT": kill_at} if kill_at else None)


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("acc_matrix.csv", "val_acc_matrix.csv", "task_acc_matrix.csv"):
        assert (a / name).exists() == (b / name).exists(), name
        if (a / name).exists():
            assert (a / name).read_text() == (b / name).read_text(), name
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    ma, mb = final_state(a)["model"], final_state(b)["model"]
    assert ma.keys() == mb.keys()
    for k in ma:  # tensors, and the extra state of attached modules (clrun.models.peft)
        same = torch.equal(ma[k], mb[k]) if isinstance(ma[k], torch.Tensor) else ma[k] == mb[k]
        assert same, k


# The default suite resumes one strategy of each kind of state (a buffer, logits in a buffer,
# a quadratic penalty, class means, a reset model, a ridge classifier, a model replaced in
# post_update, a grown model, attached modules); every strategy resumes in the slow suite
# (`pytest -m slow`, run by CI too).
RESUME_IN_DEFAULT_SUITE = {
    *("naive", "replay", "der", "ewc", "icarl", "gdumb"),  # buffers, logits, Fisher, means, reset
    *("ranpac", "foster", "pnn", "inflora"),  # statistics, replaced model, grown model, attachments
}


@pytest.mark.parametrize(
    "strategy",
    [
        s if s in RESUME_IN_DEFAULT_SUITE else pytest.param(s, marks=pytest.mark.slow)
        for s in options("strategy")
    ],
)
def test_sigkill_anywhere_then_resume_equals_uninterrupted(run_debug, tmp_path, strategy):
    _kill_anywhere_then_resume(run_debug, tmp_path, *strategy_args(strategy))


@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=replay", "strategy.buffer_update=step"),  # the buffer changes every step
        (
            "strategy=gdumb",
            "lr_schedule=cosine_restarts",
            "lr_schedule.warmup_epochs=1",
            "model.batch_norm=true",
            "strategy.epochs=3",
        ),  # the rate changes every epoch
        ("strategy=der", "benchmark.validation=0.2"),  # the validation stream is evaluated too
    ],
    ids=["replay_step_update", "gdumb_sgdr_batch_norm", "der_validation"],
)
def test_sigkill_then_resume_with_a_step_buffer_or_an_lr_schedule(run_debug, tmp_path, overrides):
    _kill_anywhere_then_resume(run_debug, tmp_path, *overrides)


def _kill_anywhere_then_resume(run_debug, tmp_path: Path, *chosen: str) -> None:
    """SIGKILL at a step drawn from the overrides, resume: the same run as never killed."""
    overrides = (*chosen, *KILLER)
    reference, ref_dir = run_debug(*overrides)
    draw = random.Random(" ".join(chosen))
    if reference["steps"]:
        kill_at = f"{draw.randrange(1, reference['steps'])}:SIGKILL"
    else:  # no gradient step (SimpleCIL, NCM): killed as an experience starts
        n = len((ref_dir / "acc_matrix.csv").read_text().splitlines()) - 1
        kill_at = f"e{draw.randrange(1, n)}:SIGKILL"
    run_dir = tmp_path / "killed"
    p = clrun(
        "debug=default",
        *overrides,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        kill_at=kill_at,
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert (
        not (run_dir / "summary.json").exists()
        or "completed" not in (run_dir / "summary.json").read_text()
    )
    resumed, _ = run_debug(*overrides, run_dir=run_dir)  # resume=auto picks the checkpoint up
    assert resumed["status"] == "completed"
    assert_same_run(ref_dir, run_dir)


def test_sigterm_checkpoints_the_current_step_and_resumes(run_debug, tmp_path):
    overrides = ("strategy=replay_lwf", *KILLER)
    _, ref_dir = run_debug(*overrides)
    run_dir = tmp_path / "term"
    p = clrun(
        "debug=default", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path, kill_at="31:SIGTERM"
    )
    assert p.returncode == 3, p.stderr
    assert "Traceback" not in p.stderr and "checkpoint saved" in p.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["error"]
    saved = final_state(run_dir)
    # the signal came during step 32 (after_step sees 31 steps done): that step was finished
    assert saved["step"] == 32 and saved["position"]["step"] == 32 - 26  # 26 steps per experience
    p = clrun("debug=default", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert_same_run(ref_dir, run_dir)


def test_checkpoint_load_keeps_random_states_on_the_cpu(run_debug, tmp_path):
    """``checkpoint.load`` moves tensors to the run's device, but generator states stay on the
    CPU, where ``set_state`` takes them (resuming on a GPU once failed on exactly this). The
    ``meta`` device stands in for a GPU."""
    from clrun import checkpoint

    run_dir = tmp_path / "term"
    p = clrun(
        "debug=default",
        "strategy=replay_lwf",
        *KILLER,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        kill_at="31:SIGTERM",
    )
    assert p.returncode == 3, p.stderr
    saved = checkpoint.load(run_dir, torch.device("meta"))
    rng, other = [], []

    def walk(node, under_rng):
        if isinstance(node, torch.Tensor):
            (rng if under_rng else other).append(node)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, under_rng or k in checkpoint.RNG_KEYS)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v, under_rng)

    walk(saved, False)
    # the torch and minibatch-order states, the mid-experience order and the buffer's generator
    assert len(rng) >= 4 and all(t.device.type == "cpu" for t in rng)
    for t in rng:
        torch.Generator().set_state(t)
    assert other and all(t.device.type == "meta" for t in other)


def test_corrupted_checkpoint_is_refused(run_debug, tmp_path):
    _, run_dir = run_debug("strategy=naive")
    path = run_dir / "checkpoint" / "state.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        run_debug("strategy=naive", run_dir=run_dir)
    # a completed run stays as it was: its summary is not overwritten by the failed attempt
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_avg_acc"] > 0.2
    # a run that did not complete records the failure
    write_json(run_dir / "summary.json", {**summary, "status": "interrupted"})
    with pytest.raises(CheckpointError, match="corrupted"):
        run_debug("strategy=naive", run_dir=run_dir)
    failed = json.loads((run_dir / "summary.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("CheckpointError")


def test_resume_with_a_different_config_is_refused_with_the_difference(run_debug, tmp_path):
    _, run_dir = run_debug("strategy=naive")
    with pytest.raises(Exception, match=r"optimizer\.lr: checkpoint 0\.001, now 0\.02"):
        run_debug("strategy=naive", "optimizer.lr=0.02", run_dir=run_dir)
    # run-management keys may differ
    summary, _ = run_debug("strategy=naive", "threads=2", "resume=true", run_dir=run_dir)
    assert summary["status"] == "completed"


def test_resume_true_without_checkpoint_and_resume_from_path(run_debug, tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        run_debug("resume=true", run_dir=tmp_path / "empty")
    ref, ref_dir = run_debug("strategy=ewc")
    copy, copy_dir = run_debug("strategy=ewc", f"resume={ref_dir}", run_dir=tmp_path / "copy")
    assert copy["final_avg_acc"] == ref["final_avg_acc"] and copy["steps"] == ref["steps"]


def test_nan_loss_fails_the_run_naming_the_step(run_debug, tmp_path):
    with pytest.raises(FloatingPointError, match="at step 17 "):
        run_debug(
            "+strategy.components.nan._target_=killer.NaNAt", "+strategy.components.nan.step=17"
        )


def test_online_stream_and_augmentation_resume_bit_identically(run_debug, tmp_path):
    """Mini-experiences, per-original-experience evaluation and the benchmark's augmentation
    generator all survive a SIGKILL."""
    overrides = (
        "strategy=replay",
        "benchmark.online=true",
        "benchmark.online_batch_size=50",
        "benchmark.augment=true",
        *KILLER,
    )
    reference, ref_dir = run_debug(*overrides)
    run_dir = tmp_path / "killed"
    p = clrun(
        "debug=default",
        *overrides,
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
        kill_at=f"{reference['steps'] // 2 + 1}:SIGKILL",
    )
    assert p.returncode == -signal.SIGKILL, p.stderr
    run_debug(*overrides, run_dir=run_dir)
    assert_same_run(ref_dir, run_dir)
