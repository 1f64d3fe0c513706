"""Continual unlearning: requests to forget past experiences in the stream, what the runner does at
one, and how well the forgetting worked.

Config (``unlearning`` in ``conf/config.yaml``):

- ``requests``: after experience i, forget experiences [j, ...] (j ≤ i), e.g. ``{3: [1]}``. At
  each request the runner (1) removes the forgotten experiences' samples from the run's replay
  buffer, (2) calls the components' ``forget(state, experiences)`` hooks: each drops or refreshes
  what it derived from the forgotten data (teachers, importance anchors, its own memory), (3) calls
  the ``unlearn(state, experiences)`` hook of the unlearning method (``amnesiac``), which changes
  the model, then (4) evaluates on the whole test stream again: an ``"event": "unlearned"`` row in
  ``metrics.jsonl``. A strategy with a component that keeps state or re-reads past data but has
  neither hook is refused: it would keep the forgotten data.
- ``disable``: run the same config but skip the requests (the model that never unlearned).
- ``exclude``: experiences never trained on (the model still grows their output units, which keep
  their initial values; evaluation still runs after them); the reference run uses it.
- ``reference``: ``auto`` trains, after the run (:func:`clrun.run.run` drives it), the reference model that never saw the forgotten
  experiences: the same config with ``exclude`` = every forgotten experience, in
  ``<run_dir>/reference`` (resumable like any run); a path uses that run directory instead;
  ``null`` skips the comparison.

Metrics (``summary.json`` → ``unlearning``): for each request, the mean accuracy on the forgotten
and on the retained experiences (trained so far, not forgotten) just before and just after it;
at the end of the stream, the same two numbers; against the reference model, the accuracy
difference per test experience (ours − reference) and, on each forgotten experience's test data,
the Jensen–Shannon divergence between the two models' predictive distributions (mean over samples,
in nats, 0 = identical, at most ln 2; ``mean_js_divergence`` averages the forgotten experiences) and the fraction of samples on which their predictions
agree. ``unlearning.png`` plots the accuracy timeline with the requests marked, and the final
accuracies beside the reference's.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf

from clrun import checkpoint
from clrun.checks import Rule, boolean, is_int, require
from clrun.components import Components, RunState
from clrun.config import ConfigError, build, build_model
from clrun.io import write_json
from clrun.metrics import Recorder

REFERENCE_DIR = "reference"
log = logging.getLogger("clrun")


@dataclass
class Plan:
    requests: dict[int, list[int]] = field(default_factory=dict)  # after i → forget [j, ...]
    exclude: set[int] = field(default_factory=set)  # experiences not trained on
    disabled: bool = False
    reference: str | None = None  # "auto", the path of a run directory, or None

    @property
    def active(self) -> bool:
        return bool(self.requests) and not self.disabled

    @property
    def forgotten(self) -> list[int]:
        return sorted({j for js in self.requests.values() for j in js})


def plan(cfg: DictConfig, n_experiences: int, components: Components | None = None) -> Plan:
    """The checked ``unlearning`` config of a run over ``n_experiences`` experiences (and, given
    the run's ``components``, whether its strategy can unlearn)."""
    node = cfg.get("unlearning")
    if node is None:
        return Plan()
    T, allowed = n_experiences, f"integers in 0..{n_experiences - 1}"
    raw = node.get("requests") or {}
    if not isinstance(raw, dict | DictConfig):
        raise ConfigError(
            f"unlearning.requests={raw!r} must map an experience to a list, e.g. {{3: [1]}}"
        )
    requests, seen = {}, set()
    for i in sorted(raw, key=lambda k: (not is_int(k), k if is_int(k) else 0)):
        js = raw[i]
        if not is_int(i) or not 0 <= i < T:
            raise ConfigError(
                f"unlearning.requests: key {i!r} must be an experience index, one of {allowed}"
            )
        if isinstance(js, int):
            js = [js]
        if not isinstance(js, list | ListConfig) or not js or not all(is_int(j) for j in js):
            raise ConfigError(
                f"unlearning.requests.{i}={js!r} must be a non-empty list of experience indices"
            )
        for j in js:
            if not 0 <= j <= i:
                raise ConfigError(
                    f"unlearning.requests.{i}: experience {j} cannot be forgotten after experience {i}: "
                    f"it must be one of 0..{i} (already learned)"
                )
            if j in seen:
                raise ConfigError(f"unlearning.requests.{i}: experience {j} is forgotten twice")
            seen.add(j)
        requests[int(i)] = [int(j) for j in js]
    exclude = node.get("exclude") or []
    experiences = Rule(
        lambda v: isinstance(v, list | ListConfig) and all(is_int(j) and 0 <= j < T for j in v),
        f"a list of {allowed}",
    )
    require("unlearning.exclude", exclude, experiences, ConfigError)
    disabled = require("unlearning.disable", node.get("disable", False), boolean(), ConfigError)
    run_dir = Rule(
        lambda v: v is None or (isinstance(v, str) and v != ""),
        "auto, null or the path of a run directory",
    )
    reference = require("unlearning.reference", node.get("reference"), run_dir, ConfigError)
    p = Plan(requests, {int(j) for j in exclude}, disabled, reference)
    if p.active and components is not None:
        _check_components(components, requests)
        if reference not in (None, "auto"):
            load_reference(reference, p)  # fail now, not after training
    return p


def _check_components(components: Components, requests: dict) -> None:
    if not components["unlearn"]:
        raise ConfigError(
            f"unlearning.requests={requests}: this strategy has no unlearning method; "
            "use an amnesiac strategy (strategy=amnesiac_naive | amnesiac_lwf | amnesiac_replay "
            "| amnesiac_ewc) or unlearning.disable=true"
        )
    for name, c in components.items.items():
        keeps = hasattr(c, "state_dict") or callable(getattr(c, "train_data", None))
        if keeps and not any(callable(getattr(c, h, None)) for h in ("forget", "unlearn")):
            raise ConfigError(
                f"unlearning.requests={requests}: component {name!r} ({type(c).__name__}) keeps or "
                "re-reads data it learned from but has no forget or unlearn hook, so it would keep the "
                "forgotten experiences; see README 'Continual unlearning' for the components that "
                "support it"
            )


def classes_only_in(state: RunState, experiences: list[int]) -> set[int]:
    """Classes of ``experiences`` that no other experience learned so far has (in the class and
    task scenarios, the units that only forgotten data trained)."""
    now, tests = state.benchmark.origin(state.experience), state.benchmark.test_stream
    kept = {c for k in range(now + 1) if k not in experiences for c in tests[k].classes}
    return {c for j in experiences for c in tests[j].classes} - kept


def without_experiences(samples: dict, experiences: list[int]) -> dict:
    """A dict of per-sample tensors (with ``e``) without the samples of ``experiences``."""
    e = samples["e"]
    keep = ~torch.isin(e, torch.tensor(list(experiences), dtype=e.dtype, device=e.device))
    return {f: v[keep] for f, v in samples.items()}


def handle_request(
    state: RunState,
    components: Components,
    recorder,
    after: int,
    experiences: list[int],
    evaluate: Callable[[], list[dict]],
) -> None:
    """The runner's unlearning step after experience ``after``: purge the run's buffer, call the
    components' ``forget`` hooks, then the unlearning method's ``unlearn``, then evaluate."""
    t0, purged = time.perf_counter(), 0
    if state.buffer is not None and len(state.buffer):
        purged = state.buffer.purge(experiences)
    for hook in components["forget"]:
        hook(state, experiences)
    for hook in components["unlearn"]:
        hook(state, experiences)
    results = evaluate()
    info = {"buffer_samples_removed": purged}
    recorder.record_unlearning(after, experiences, results, time.perf_counter() - t0, info)
    log.info("unlearning.requests.%d: forgot experiences %s", after, experiences)  # 0-based, as set


def reference_dir(cfg: DictConfig, run_dir: Path, summary: dict) -> Path | None:
    """The reference run that the completed run in ``run_dir`` (its ``summary``) still has to be
    compared with: ``<run_dir>/reference`` for ``reference: auto`` (trained by the caller if it
    is not there yet), the given path, or None."""
    if (summary.get("unlearning") or {}).get("reference") != "pending":
        return None
    reference = cfg.unlearning.reference
    return Path(run_dir) / REFERENCE_DIR if reference == "auto" else Path(reference)


def compare_with_reference(cfg: DictConfig, run_dir: Path, reference: Path) -> dict:
    """Compare the final model of the completed run in ``run_dir`` with the completed reference
    run's: ``summary.json``'s ``unlearning.reference`` (see the module docstring) and
    ``unlearning.png``. Both models are rebuilt from their checkpoints."""
    from clrun.config import resolve_device

    device = resolve_device(cfg.device)
    benchmark = build(cfg.benchmark, "benchmark").to(device)
    p = plan(cfg, len(benchmark.test_stream))
    ours, theirs = checkpoint.load(Path(run_dir), device), load_reference(reference, p)
    models = []
    for saved in (ours, theirs):
        model = build_model(cfg, benchmark, device)
        model.load_state_dict(saved["model"])  # dynamic heads take the saved size
        models.append(model)
    state = RunState(
        models[0],
        benchmark,
        device,
        batch_size=cfg.strategy.batch_size,
        precision=cfg.get("precision", "fp32"),
        channels_last=bool(cfg.get("channels_last")),
    )
    recorder = Recorder(Path(run_dir), len(benchmark.test_stream))
    recorder.load_state_dict(ours["recorder"])
    final = [r["acc"] for r in recorder.final()]
    reference_final = [r["acc"] for r in theirs["recorder"]["rows"][-1]]
    batch_size = int(OmegaConf.select(cfg, "strategy.eval_batch_size") or 1000)
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    summary["unlearning"]["reference"] = {
        "run_dir": str(reference),
        **compare(state, models[1], p.forgotten, final, reference_final, batch_size),
    }
    write_json(Path(run_dir) / "summary.json", summary)
    plot(run_dir, recorder, summary, OmegaConf.select(cfg, "plots.format", default=["png"]))
    return summary


def plot(run_dir: Path, recorder, summary: dict, formats: list[str]) -> None:
    """``unlearning.<format>``: the accuracy timeline with the requests, and the reference's."""
    from clrun import plots
    from clrun.outcome import run_title

    block, title = summary["unlearning"], run_title(summary)
    plots.plot_unlearning(run_dir, recorder, block, title, formats)


def summary(p: Plan, recorder, components: Components) -> dict:
    """The ``summary.json`` entries of unlearning: the memory components hold and, where the run
    has requests or excludes experiences, the ``unlearning`` block (see the module docstring)."""
    out: dict = {}
    memory = {
        n: round(c.memory_mb(), 3)
        for n, c in components.items.items()
        if callable(getattr(c, "memory_mb", None))
    }
    if memory:
        out["component_memory_mb"] = memory
    if not (p.requests or p.exclude):
        return out
    block: dict = {
        "requests": {str(i): js for i, js in p.requests.items()},
        "disabled": p.disabled,
        "exclude": sorted(p.exclude),
        "events": [],
    }
    forgotten: set[int] = set()
    for event in recorder.unlearned:
        i = event["after_experience"]
        forgotten |= set(event["forgotten"])
        block["events"].append(
            {
                "after_experience": i,
                "forgotten": event["forgotten"],
                "seconds": event["seconds"],
                "buffer_samples_removed": event["buffer_samples_removed"],
                **_accuracies(
                    recorder.rows[i], forgotten, set(range(i + 1)) - p.exclude, "_before"
                ),
                **_accuracies(event["results"], forgotten, set(range(i + 1)) - p.exclude, "_after"),
            }
        )
    if recorder.rows:
        trained = set(range(len(recorder.rows))) - p.exclude
        block["forgotten"] = sorted(forgotten)
        block.update(_accuracies(recorder.final(), forgotten, trained, "", prefix="final_"))
    if p.active and p.reference is not None:
        block["reference"] = "pending"  # compare_with_reference fills it in
    out["unlearning"] = block
    return out


def _accuracies(
    results: list[dict], forgotten: set[int], trained: set[int], suffix: str, prefix: str = ""
) -> dict:
    acc = [r["acc"] for r in results]
    return {
        f"{prefix}forgotten_acc{suffix}": _mean([acc[j] for j in sorted(forgotten)]),
        f"{prefix}retained_acc{suffix}": _mean([acc[j] for j in sorted(trained - forgotten)]),
    }


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


@torch.inference_mode()
def compare(
    state: RunState,
    reference: torch.nn.Module,
    forgotten: list[int],
    final: list[float],
    reference_final: list[float],
    batch_size: int,
) -> dict:
    """Our final model against the reference: accuracy difference per test experience, and on each
    forgotten experience's test data the JS divergence and prediction agreement."""
    model = state.model
    was_training = model.training
    model.eval(), reference.eval()
    distance = {}
    for j in forgotten:
        exp = state.benchmark.test_stream[j]
        js = torch.zeros((), dtype=torch.float64, device=state.device)
        agree = torch.zeros((), dtype=torch.float64, device=state.device)
        for i in range(0, len(exp), batch_size):
            x = state.model_input(exp.x[i : i + batch_size], exp.e[i : i + batch_size])
            t = exp.t[i : i + batch_size]
            with state.autocast():
                a, b = model(x, t).float(), reference(x, t).float()
            js += js_divergence(F.log_softmax(a, 1), F.log_softmax(b, 1)).sum()
            agree += (a.argmax(1) == b.argmax(1)).sum()
        distance[str(j)] = {
            "js_divergence": float(js) / len(exp),
            "agreement": float(agree) / len(exp),
        }
    model.train(was_training)
    return {
        "acc_diff": [a - b for a, b in zip(final, reference_final, strict=True)],
        "reference_acc": list(reference_final),
        "forgotten": distance,
        "mean_js_divergence": sum(d["js_divergence"] for d in distance.values()) / len(distance),
    }


def js_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row Jensen–Shannon divergence (nats) between distributions given as log-probabilities."""
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), 0) - math.log(2)
    kl = lambda a: (a.exp() * (a - log_m)).sum(1)  # noqa: E731
    return (0.5 * (kl(log_p) + kl(log_q))).clamp(min=0)


def reference_config(cfg: DictConfig) -> DictConfig:
    """The config of the reference run: the same, never training on the forgotten experiences
    (those of every request, and those the run already excludes)."""
    requests = OmegaConf.to_container(cfg.unlearning.requests, resolve=True) or {}
    forgotten = {j for js in requests.values() for j in ([js] if isinstance(js, int) else js)}
    ref = copy.deepcopy(cfg)
    OmegaConf.set_struct(ref, False)
    ref.unlearning = {
        "requests": {},
        "disable": False,
        "reference": None,
        "exclude": sorted(forgotten | set(cfg.unlearning.get("exclude") or [])),
    }
    return ref


def load_reference(path: str | Path, p: Plan) -> dict:
    """The final state of a completed reference run directory, checked against the plan."""
    summary = Path(path) / "summary.json"
    status = json.loads(summary.read_text()).get("status") if summary.exists() else None
    saved = checkpoint.load(Path(path), torch.device("cpu")) if status == "completed" else None
    if saved is None:
        raise ConfigError(
            f"unlearning.reference={str(path)!r} is not a completed run directory "
            f"(its summary.json says status {status!r}; it needs one and a checkpoint)"
        )
    excluded = set(saved["config"].get("unlearning", {}).get("exclude") or [])
    if not set(p.forgotten) <= excluded:
        raise ConfigError(
            f"unlearning.reference={str(path)!r} trained on experiences "
            f"{sorted(set(p.forgotten) - excluded)} that this run forgets: a reference run "
            f"needs unlearning.exclude={p.forgotten}"
        )
    return saved
