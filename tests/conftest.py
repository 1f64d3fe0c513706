"""Shared helpers: compose configs with Hydra's compose API and run them in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from clrun.cli import config_dir

CONF = config_dir()
ROOT = Path(__file__).resolve().parents[1]
GROUPS = (
    *("benchmark", "model", "strategy", "buffer", "optimizer"),  # their choices go in summaries
    *("debug", "experiment", "lr_schedule", "logger", "hparams_search"),
)

# model=timm: a two-block ViT-Tiny on 16×16 inputs (the default ViT-B/16 at 224 px takes minutes)
TIMM_TINY = [
    "model=timm",
    "model.name=vit_tiny_patch16_224",
    "model.img_size=16",
    "model.patch_size=4",
    "+model.create_args.depth=2",
]
# Strategies that need a timm ViT (they refuse other models in one line): the tests that run
# every strategy run these on TIMM_TINY with half the samples (about 10 s on one CPU thread).
VIT_STRATEGIES = ("aper", "ease", "inflora", "slca", "l2p", "dualprompt", "coda_prompt")
VIT_QUICK = ("benchmark.train_per_class=100", "benchmark.test_per_class=25")
# task-incremental only methods (architecture methods with one mask or column per task)
TASK_IL = ("benchmark.scenario=task", "model.head=multi")
# What the tests that run every strategy add to ``strategy=<name>``: the scenario a method
# declares, or lighter settings where the paper's defaults are too heavy for a seconds-long debug
# run (RanPAC's M = 10,000 random features make an 800 MB Gram matrix and a 10,000 × 10,000
# solve per experience: about 2 minutes on one CPU thread; DualPrompt's and CODA-P's prompt
# blocks 0-4 need a ViT of at least 5 blocks).
# LUCIR's learned scale σ starts at 1 (logits are cosines): with the default Adam at 0.001 it
# grows too slowly for a 2-epoch run; the paper's SGD (0.1, momentum 0.9) learns it.
STRATEGY_ARGS: dict[str, tuple[str, ...]] = {
    "ranpac": ("strategy.M=1000",),
    # FOSTER's 130 compression epochs per experience take a minute on one thread
    "foster": ("strategy.compression_epochs=2",),
    # InfLoRA trains each experience's units with the cross-entropy over its own classes (the
    # authors' per-task heads): in the debug run's 14 Adam steps at lr 0.001 on a random
    # two-block ViT the new units do not outgrow the old ones in class-IL (some R[i][i] = 0); at
    # lr 0.02 they do.
    "inflora": ("optimizer.lr=0.02",),
    "pnn": TASK_IL,
    "packnet": TASK_IL,
    "hat": TASK_IL,
    # the papers' prompt blocks (0-4) do not exist in the two-block test ViT
    "dualprompt": ("strategy.g_layers=[0]", "strategy.e_layers=[1]"),
    "coda_prompt": ("strategy.layers=[0,1]",),
    # MEMO needs a ResNet (its generalised / specialised split): the reduced ResNet-18 at nf=4
    "memo": ("model=resnet18_reduced", "model.nf=4"),
}
# ViT strategies that train only prompts and a head on the frozen ViT: on the random two-block
# test ViT a seconds-long run learns little (its random attention carries little of the image
# into the prompts and the [CLS] token; train loss near chance after 28 steps), so the
# every-strategy test checks that they run, not that they learn; tests/test_methods_prompts.py
# checks what they train and what stays frozen.
PROMPT_STRATEGIES = ("l2p", "dualprompt", "coda_prompt")


def strategy_args(strategy: str) -> list[str]:
    """The overrides that run ``strategy`` in a debug test: the tiny ViT for those that need
    one (skipped without timm), else the default model; plus its ``STRATEGY_ARGS``."""
    extra = list(STRATEGY_ARGS.get(strategy, ()))
    if strategy not in VIT_STRATEGIES:
        return [f"strategy={strategy}", *extra]
    pytest.importorskip("timm")
    return [f"strategy={strategy}", *TIMM_TINY, *VIT_QUICK, *extra]


def options(group: str) -> list[str]:
    """The options of a config group. ``experiment`` holds one folder per paper: its options are
    ``<paper>/<preset>``, and the ``protocol*.yaml`` files there are included by presets, not
    options of their own."""
    if group == "experiment":
        return sorted(
            p.relative_to(CONF / group).with_suffix("").as_posix()
            for p in (CONF / group).glob("*/*.yaml")
            if not p.stem.startswith("protocol")
        )
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make_cfg(*overrides: str) -> DictConfig:
    return compose_with_choices(*overrides)[0]


def vit_state(*overrides: str):
    """The run state of a debug run on the tiny ViT (TIMM_TINY, VIT_QUICK), built as the runner
    builds it, with the model initialised from seed 0."""
    import torch

    from clrun.components import RunState
    from clrun.config import build, build_model

    cfg = make_cfg("debug=default", *TIMM_TINY, *VIT_QUICK, *overrides)
    torch.manual_seed(0)
    benchmark = build(cfg.benchmark, "benchmark")
    model = build_model(cfg, benchmark, torch.device("cpu"))
    return RunState(model, benchmark, torch.device("cpu"), batch_size=32)


def compose_with_choices(*overrides: str) -> tuple[DictConfig, dict[str, str]]:
    """The composed config (without Hydra's own node) and the chosen option of each group."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS[:5]}
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, choices


@pytest.fixture
def run_debug(tmp_path: Path):
    """run_debug(*overrides) → (summary, run_dir) of a debug run in a fresh directory."""
    from clrun.run import run

    counter = iter(range(1000))

    def _run(*overrides: str, run_dir: Path | None = None):
        run_dir = run_dir or tmp_path / f"run{next(counter)}"
        cfg, choices = compose_with_choices("debug=default", *overrides)
        choices["overrides"] = ["debug=default", *overrides]  # as the CLI records them
        return run(cfg, run_dir, choices), run_dir

    return _run


def clrun(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    """The ``clrun`` command in a subprocess (this checkout and tests/ importable)."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), *_pythonpath(env)])
    return subprocess.run(
        [sys.executable, "-m", "clrun", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONPATH": path},
        timeout=timeout,
    )


def _pythonpath(env: dict | None) -> list[str]:
    """Entries of PYTHONPATH given by the test (first) and by the environment (kept last)."""
    parts = [(env or {}).get("PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")]
    return [p for part in parts for p in part.split(os.pathsep) if p]


def round_trip(component) -> dict:
    """The component's state through a checkpoint file (weights_only, as the runner loads it)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(component.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def has_torchvision() -> bool:
    """torchvision from PyPI fails to import with the CPU torch wheel: tests needing it skip."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def assert_learned(run_dir: Path, margin: float = 0.3, first: int | None = None) -> None:
    """Each experience was learned when it was trained on: R[i][i] (test accuracy on experience
    i right after training on it) beats the untrained model's accuracy on i by ``margin``. Holds
    in every scenario (chance is 1/2 per experience in task and domain, lower in class), and
    fails for a run that trains nothing, diverges or evaluates the wrong head. ``first``: check
    only the first experiences (runs too short to learn the later ones beside the old)."""
    import json

    import numpy as np

    R = np.loadtxt(run_dir / "acc_matrix.csv", delimiter=",", skiprows=1, ndmin=2)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    untrained = {r["eval_exp"]: r["acc"] for r in rows if r["trained_through"] == -1}
    for i in range(len(R) if first is None else first):
        assert R[i][i] > untrained[i] + margin, (i, untrained[i], R)
