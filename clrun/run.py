"""The training procedure, top to bottom: build five things from config, then for each
experience train, let the strategy's components do their part, evaluate on the whole test stream,
and checkpoint. Components are called at the hooks listed in :mod:`clrun.components`; nothing in
this file knows any method by name.
"""

from __future__ import annotations

import logging
import math
import platform
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import clrun
from clrun import checkpoint
from clrun.benchmarks import Experience
from clrun.components import Components, RunState
from clrun.config import ConfigError, build, validate
from clrun.io import write_json
from clrun.metrics import Recorder, summarize
from clrun.models import adapt_model

log = logging.getLogger("clrun")
# Keys that may differ between a run and its resumption.
RUN_MANAGEMENT_KEYS = ("resume", "threads", "data_dir")


def run(cfg: DictConfig, run_dir: str | Path, choices: dict[str, str] | None = None) -> dict:
    """Run one experiment into ``run_dir``; return its summary. A failure is written to
    ``summary.json`` with ``status: failed`` before the exception propagates."""
    run_dir, t_start = Path(run_dir), time.perf_counter()
    summary: dict = {"status": "running", **(choices or {}), "seed": cfg.get("seed")}
    recorder = None
    try:
        validate(cfg)
        device = _device(cfg.device)
        if cfg.get("threads"):
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)  # minibatch order

        benchmark = build(cfg.benchmark, "benchmark").to(device)
        shape = {"input_shape": benchmark.input_shape, "n_classes": benchmark.n_classes}
        model = build(cfg.model, "model", **shape).to(device)
        buffer = build(cfg.buffer, "buffer", seed=cfg.seed) if cfg.get("buffer") else None
        components = Components(
            {
                name: build(node, f"strategy.components.{name}", buffer=buffer, seed=cfg.seed)
                for name, node in (cfg.strategy.get("components") or {}).items()
                if node is not None
            }
        )
        if not any(getattr(c, "buffer", None) is buffer for c in components.items.values()):
            summary["buffer"] = None  # configured but used by no component
        make_optimizer = build(cfg.optimizer, "optimizer")
        s = cfg.strategy
        state = RunState(model, benchmark, device, batch_size=s.batch_size)
        state.optimizer = make_optimizer(model.parameters())
        recorder = Recorder(run_dir, len(benchmark.train_stream))

        start = 0
        saved = checkpoint.load(run_dir, device) if cfg.get("resume") else None
        if saved is not None:
            _check_same_config(saved["config"], cfg)
            model.load_state_dict(saved["model"])
            state.optimizer = make_optimizer(model.parameters())
            state.optimizer.load_state_dict(saved["optimizer"])
            components.load_state_dict(saved["components"])
            if buffer is not None:
                buffer.load_state_dict(saved["buffer"])
            recorder.load_state_dict(saved["recorder"])
            torch.set_rng_state(saved["rng"]["torch"].cpu())
            gen.set_state(saved["rng"]["data"].cpu())
            state.step, start = saved["step"], saved["next_experience"]
            log.info("resumed from %s at experience %d", run_dir / checkpoint.FILE, start)
        else:
            recorder.record(-1, evaluate(state, components, s.eval_batch_size))

        progress = sys.stderr.isatty()
        for exp in benchmark.train_stream[start:]:
            state.experience = exp.index
            data = exp
            for hook in components["train_data"]:
                data = hook(state, data)
            for hook in components["pre_update"]:
                hook(state, exp)
            reset = state.reset_optimizer or cfg.optimizer.get("reset_each_experience", False)
            if adapt_model(model, data) or reset:
                state.optimizer = _rebuild(make_optimizer, model, state.optimizer, keep_state=not reset)
            state.reset_optimizer = False

            t0 = time.perf_counter()
            steps, samples = train_experience(state, data, components, gen, s, progress)
            for hook in components["post_update"]:
                hook(state, exp)
            t1 = time.perf_counter()
            results = evaluate(state, components, s.eval_batch_size)
            recorder.timings.append(
                {
                    "experience": exp.index,
                    "steps": steps,
                    "samples": samples,
                    "train_s": t1 - t0,
                    "eval_s": time.perf_counter() - t1,
                }
            )
            recorder.record(exp.index, results)
            seen = [r["acc"] for r in results[: exp.index + 1]]
            log.info(
                "experience %d/%d: %d steps in %.1fs, accuracy on seen experiences %.4f",
                exp.index + 1,
                len(benchmark.train_stream),
                steps,
                t1 - t0,
                sum(seen) / len(seen),
            )
            checkpoint.save(
                run_dir,
                {
                    "config": OmegaConf.to_container(cfg, resolve=True),
                    "next_experience": exp.index + 1,
                    "step": state.step,
                    "model": model.state_dict(),
                    "optimizer": state.optimizer.state_dict(),
                    "components": components.state_dict(),
                    "buffer": buffer.state_dict() if buffer is not None else None,
                    "recorder": recorder.state_dict(),
                    "rng": {"torch": torch.get_rng_state(), "data": gen.get_state()},
                },
            )

        summary.update(status="completed", **_results(recorder, t_start, device))
        write_json(run_dir / "summary.json", summary)
        from clrun.plots import plot_run

        plot_run(run_dir, recorder.acc_matrix, _title(choices, cfg))
        return summary
    except BaseException as e:
        summary.update(
            status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
            error=f"{type(e).__name__}: {e}",
        )
        if not isinstance(e, ConfigError | KeyboardInterrupt):
            summary["traceback"] = traceback.format_exc()
        if recorder is not None and recorder.rows:
            summary.update(_results(recorder, t_start, None))
        write_json(run_dir / "summary.json", summary)
        raise


def train_experience(
    state: RunState,
    data: Experience,
    components: Components,
    gen: torch.Generator,
    s: DictConfig,
    progress: bool,
) -> tuple[int, int]:
    """Train on one experience: ``s.epochs`` passes over ``data`` in seeded random order, or
    exactly ``s.iterations`` minibatch steps if set. Returns (steps, samples seen)."""
    n, bs, model, device = len(data), s.batch_size, state.model, state.device
    if n == 0:
        return 0, 0
    total = s.iterations or s.epochs * math.ceil(n / bs)
    loss_fn = components["loss"][-1] if components["loss"] else _cross_entropy
    model.train()
    loss_sum = torch.zeros((), device=device)
    step = samples = 0
    bar = tqdm(total=total, desc=f"experience {data.index}", disable=not progress, leave=False)
    while step < total:
        order = torch.randperm(n, generator=gen).to(device, non_blocking=True)
        for i in range(0, n, bs):
            if step == total:
                break
            batch = data.subset(order[i : i + bs])
            for hook in components["replay"]:
                batch = hook(state, batch)
            x = state.benchmark.prepare(batch.x, batch.e, train=True)
            out = model(x, batch.t)
            loss = loss_fn(state, batch, x, out)
            for hook in components["penalty"]:
                term = hook(state, batch, x, out)
                if term is not None:
                    loss = loss + term
            state.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for hook in components["after_backward"]:
                hook(state)
            state.optimizer.step()
            for hook in components["after_step"]:
                hook(state, batch, x, out)
            loss_sum += loss.detach()
            step, samples, state.step = step + 1, samples + len(batch), state.step + 1
            bar.update()
    bar.close()
    if not torch.isfinite(loss_sum):  # one host sync per experience
        raise FloatingPointError(
            f"the training loss became NaN or infinite during experience {data.index} "
            f"(by step {state.step} of the run); lower optimizer.lr or check the data"
        )
    return step, samples


@torch.inference_mode()
def evaluate(state: RunState, components: Components, batch_size: int) -> list[dict]:
    """Accuracy and mean loss on every test experience (counts stay on the device until the end)."""
    model, prepare = state.model, state.benchmark.prepare
    predict = components["predict"][-1] if components["predict"] else None
    was_training = model.training
    model.eval()
    sums = []
    for exp in state.benchmark.test_stream:
        correct = torch.zeros((), device=state.device)
        loss = torch.zeros((), device=state.device)
        for i in range(0, len(exp), batch_size):
            x = prepare(exp.x[i : i + batch_size], exp.e[i : i + batch_size])
            y, t = exp.y[i : i + batch_size], exp.t[i : i + batch_size]
            out = predict(state, x, t) if predict else model(x, t)
            correct += (out.argmax(1) == y).sum()
            loss += F.cross_entropy(out.float(), y, reduction="sum")
        sums.append(torch.stack([correct, loss]))
    model.train(was_training)
    values = torch.stack(sums).tolist()
    return [
        {"acc": c / len(exp), "loss": lo / len(exp), "n": len(exp)}
        for (c, lo), exp in zip(values, state.benchmark.test_stream, strict=True)
    ]


def _cross_entropy(state: RunState, batch: Experience, x: torch.Tensor, out: torch.Tensor):
    return F.cross_entropy(out, batch.y)


def _rebuild(
    make_optimizer, model: torch.nn.Module, old: torch.optim.Optimizer, keep_state: bool
) -> torch.optim.Optimizer:
    """A new optimiser over the model's current parameters; parameters that survived keep
    their optimiser state (momentum, Adam moments) unless ``keep_state`` is false."""
    new = make_optimizer(model.parameters())
    if keep_state:
        for p in model.parameters():
            if p in old.state:
                new.state[p] = old.state[p]
    return new


def _check_same_config(saved: dict, cfg: DictConfig) -> None:
    now = OmegaConf.to_container(cfg, resolve=True)
    flat_saved, flat_now = _flatten(saved), _flatten(now)
    diff = [
        f"{k}: checkpoint {flat_saved.get(k)!r} → now {flat_now.get(k)!r}"
        for k in sorted(set(flat_saved) | set(flat_now))
        if flat_saved.get(k) != flat_now.get(k) and k.split(".")[0] not in RUN_MANAGEMENT_KEYS
    ]
    if diff:
        raise ConfigError(
            "resume=true refused, the config differs from the checkpoint's: " + "; ".join(diff)
        )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} is not available on this machine: use auto or cpu")
    return device


def _results(recorder: Recorder, t_start: float, device: torch.device | None) -> dict:
    R, timings = recorder.acc_matrix, recorder.timings
    train_s = sum(t["train_s"] for t in timings)
    out = {
        **summarize(R, recorder.baseline),
        "experiences_done": len(R),
        "steps": sum(t["steps"] for t in timings),
        "wall_time_s": time.perf_counter() - t_start,
        "train_time_s": train_s,
        "eval_time_s": sum(t["eval_s"] for t in timings),
        "samples_per_s": sum(t["samples"] for t in timings) / train_s if train_s else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "versions": {
            "clrun": clrun.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    if device is not None:
        out["device"] = str(device)
        if device.type == "cuda":
            out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _title(choices: dict[str, str] | None, cfg: DictConfig) -> str:
    c = choices or {}
    return f"{c.get('strategy', '?')} on {c.get('benchmark', '?')} ({c.get('model', '?')}), seed {cfg.seed}"
