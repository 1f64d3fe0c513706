"""The training procedure, top to bottom: build five things from config, then for each
experience train, let the strategy's components do their part, evaluate on the whole test stream,
and checkpoint. Components are called at the hooks listed in :mod:`clrun.components`; nothing in
this file knows any method by name.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from clrun import checkpoint, plots, unlearning
from clrun.benchmarks import Experience
from clrun.components import Components, RunState, adapt
from clrun.config import ConfigError, build, resolve_device, set_deterministic, validate
from clrun.io import flatten, write_json
from clrun.loggers import NoLogger
from clrun.metrics import Recorder, Work, run_summary
from clrun.preemption import RunInterrupted, StopSignal

log = logging.getLogger("clrun")


def run(cfg: DictConfig, run_dir: str | Path, choices: dict[str, str] | None = None) -> dict:
    """Run one experiment into ``run_dir``; return its summary. A failure or an interruption is
    written to ``summary.json`` (``status: failed`` / ``interrupted``) before it propagates."""
    run_dir, t_start = Path(run_dir), time.perf_counter()
    summary: dict = {"status": "running", **(choices or {}), "seed": cfg.get("seed")}
    recorder, stop, logger = None, None, NoLogger()
    try:
        validate(cfg)
        device = resolve_device(cfg.device)
        if cfg.get("threads"):
            torch.set_num_threads(cfg.threads)
        set_deterministic(bool(cfg.get("deterministic")))
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)  # minibatch order

        benchmark = build(cfg.benchmark, "benchmark").to(device)
        shape = {"input_shape": benchmark.input_shape, "n_classes": benchmark.n_classes}
        model = build(cfg.model, "model", **shape).to(device)
        if cfg.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        if cfg.get("compile"):
            model.compile()  # in place: state_dict keys and deepcopy stay as they are
        buffer = build(cfg.buffer, "buffer", seed=cfg.seed) if cfg.get("buffer") else None
        components = Components({
            name: build(node, f"strategy.components.{name}", buffer=buffer, seed=cfg.seed)
            for name, node in (cfg.strategy.get("components") or {}).items() if node is not None
        })  # fmt: skip
        uses_buffer = any(getattr(c, "buffer", None) is buffer for c in components.items.values())
        if not uses_buffer:
            summary["buffer"] = None  # configured but used by no component
        plan = unlearning.plan(cfg, len(benchmark.test_stream), components)
        make_optimizer = build(cfg.optimizer, "optimizer")
        s = cfg.strategy
        state = RunState(model, benchmark, device, batch_size=s.batch_size,
                         precision=cfg.get("precision", "fp32"),
                         channels_last=bool(cfg.get("channels_last")),
                         buffer=buffer if uses_buffer else None,
                         lr_schedule=build(cfg.lr_schedule, "lr_schedule") if cfg.get("lr_schedule") else None)  # fmt: skip
        state.optimizer = make_optimizer(model.parameters())
        recorder = Recorder(run_dir, len(benchmark.test_stream))  # one column per test experience
        work = Work()  # steps, samples, seconds since the last evaluation
        every_n = OmegaConf.select(cfg, "checkpoint.every_n_steps")
        if cfg.get("logger"):  # the config goes flat: no nested _target_ for Hydra to build
            config = flatten(OmegaConf.to_container(cfg, resolve=True))
            logger = build(cfg.logger, "logger", run_dir=str(run_dir), run_config=config)

        def save(next_experience: int, position: dict | None = None) -> None:
            checkpoint.save(run_dir, {
                "config": OmegaConf.to_container(cfg, resolve=True),
                "next_experience": next_experience, "position": position, "step": state.step,
                "model": model.state_dict(), "optimizer": state.optimizer.state_dict(),
                "components": components.state_dict(), "recorder": recorder.state_dict(),
                "buffer": buffer.state_dict() if buffer is not None else None,
                "rng": checkpoint.rng_state(gen, device),
                "benchmark": benchmark.state_dict(), "work": vars(work),
            })  # fmt: skip

        start, position = 0, None
        saved = checkpoint.load_for_resume(cfg, run_dir, device)
        if saved is not None:
            model.load_state_dict(saved["model"])
            state.optimizer = make_optimizer(model.parameters())
            state.optimizer.load_state_dict(saved["optimizer"])
            components.load_state_dict(saved["components"])
            if buffer is not None:
                buffer.load_state_dict(saved["buffer"])
            recorder.load_state_dict(saved["recorder"])
            checkpoint.restore_rng(saved["rng"], gen, device)
            benchmark.load_state_dict(saved["benchmark"])
            vars(work).update(saved["work"])
            state.step, start, position = saved["step"], saved["next_experience"], saved["position"]
            log.info("resumed from %s at experience %d, step %d", checkpoint.FILE, start, state.step)  # fmt: skip
        else:
            recorder.record(-1, evaluate(state, components, s.eval_batch_size))

        stop = StopSignal()  # from here on, SIGTERM/SIGINT finish the step and checkpoint

        def on_step(where: Callable[[], dict]) -> None:
            if stop.requested or (every_n and state.step % every_n == 0):
                save(state.experience, where())
                stop.hand_over()  # if a signal came

        def learn(exp: Experience, position: dict | None) -> None:
            data = exp
            for hook in components["train_data"]:
                data = hook(state, data)
            if position is None:  # not resuming inside this experience
                for hook in components["pre_update"]:
                    hook(state, exp)
                reset = state.reset_optimizer or cfg.optimizer.get("reset_each_experience", False)
                state.optimizer = adapt(model, data, state.optimizer, make_optimizer, reset)
                state.reset_optimizer = False
            t0 = time.perf_counter()
            steps, samples, losses = train_experience(state, data, components, gen, s, on_step, position)  # fmt: skip
            for hook in components["post_update"]:
                hook(state, exp)
            work.add(steps, samples, losses, time.perf_counter() - t0)
            logger.log_steps(state.step - steps, losses)

        for exp in benchmark.train_stream[start:]:
            state.experience = exp.index
            if benchmark.origin(exp.index) not in plan.exclude:
                learn(exp, position)
            else:  # a reference run: the units exist, never trained
                state.optimizer = adapt(model, exp, state.optimizer, make_optimizer)
            position = None
            if benchmark.ends_experience(exp.index):  # online streams: once per original one
                i, t1 = benchmark.origin(exp.index), time.perf_counter()
                results = evaluate(state, components, s.eval_batch_size)
                recorder.add_timing(i, work.take(), eval_s=time.perf_counter() - t1)
                recorder.record(i, results)
                logger.log_experience(i, results, recorder.timings[-1], recorder.acc_matrix)
                log.info(recorder.progress(i))
                if plan.active and i in plan.requests:
                    unlearning.handle_request(state, components, recorder, i, plan.requests[i],
                                              lambda: evaluate(state, components, s.eval_batch_size))  # fmt: skip
            save(exp.index + 1)
            stop.hand_over()

        summary.update(status="completed", **run_summary(recorder, t_start, device))
        summary.update(unlearning.summary(plan, recorder, components))
        write_json(run_dir / "summary.json", summary)
        title = f"{summary.get('strategy')} on {summary.get('benchmark')} ({summary.get('model')}), seed {cfg.seed}"  # fmt: skip
        plots.plot_run(run_dir, recorder.acc_matrix, title, cfg.plots.format)
        if plan.active:  # after the results are safe on disk; a reference run traps signals itself
            stop.restore()
            unlearning.finish(cfg, plan, run_dir, choices, state, recorder, summary, title)
        logger.close(summary)
        return summary
    except BaseException as e:
        _write_failure(run_dir, summary, e, recorder, t_start)
        logger.close(summary)
        raise
    finally:
        if stop is not None:
            stop.restore()


def train_experience(state: RunState, data: Experience, components: Components,
                     gen: torch.Generator, s: DictConfig, on_step: Callable,
                     resume_at: dict | None = None) -> tuple[int, int, torch.Tensor]:  # fmt: skip
    """Train on one experience: ``s.epochs`` passes over ``data`` in seeded random order, or
    exactly ``s.iterations`` minibatch steps if set. ``resume_at`` continues a checkpointed
    position inside the experience. Returns (steps, samples seen, the loss of every step)."""
    n, bs, model, device = len(data), s.batch_size, state.model, state.device
    if n == 0:
        return 0, 0, torch.zeros(0)
    total = s.iterations or s.epochs * math.ceil(n / bs)
    loss_fn = components["loss"][-1] if components["loss"] else _cross_entropy
    losses = torch.zeros(total, device=device)  # read once, at the end: no per-step host sync
    step, samples = (resume_at["step"], resume_at["samples"]) if resume_at else (0, 0)
    if resume_at:
        losses[:step] = resume_at["losses"]
    model.train()
    bar = tqdm(total=total, initial=step, desc=f"experience {data.index}", disable=not sys.stderr.isatty(), leave=False)  # fmt: skip
    while step < total:
        if state.lr_schedule is not None:  # this epoch's learning rate
            state.lr_schedule.apply(state.optimizer, step // math.ceil(n / bs))
        epoch_start = resume_at["gen_state"] if resume_at else gen.get_state()
        gen.set_state(epoch_start)
        order = torch.randperm(n, generator=gen).to(device, non_blocking=True)
        first, resume_at = (resume_at["offset"] if resume_at else 0), None
        for i in range(first, n, bs):
            if step == total:
                break
            batch = data.subset(order[i : i + bs])
            for hook in components["replay"]:
                batch = hook(state, batch)
            x = state.to_model_format(state.benchmark.prepare(batch.x, batch.e, train=True))
            with state.autocast():
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
            losses[step] = loss.detach()
            step, samples, state.step = step + 1, samples + len(batch), state.step + 1
            bar.update()
            on_step(lambda g=epoch_start, i=i, step=step, samples=samples: {
                "gen_state": g, "offset": i + bs, "step": step, "samples": samples,
                "losses": losses[:step].clone()})  # fmt: skip
    bar.close()
    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()  # one host sync
    if bad:
        raise FloatingPointError(
            f"the training loss became {losses[bad[0]].item()} at step {state.step - total + bad[0] + 1}"
            f" of the run (experience {data.index}); lower optimizer.lr or check the data"
        )
    return step, samples, losses


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
            x = state.to_model_format(prepare(exp.x[i : i + batch_size], exp.e[i : i + batch_size]))
            y, t = exp.y[i : i + batch_size], exp.t[i : i + batch_size]
            with state.autocast():
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


def _write_failure(run_dir: Path, summary: dict, e: BaseException, recorder: Recorder | None,
                   t_start: float) -> None:  # fmt: skip
    """``summary.json`` of a run that failed or stopped: its error and the metrics it had."""
    stopped = isinstance(e, RunInterrupted | KeyboardInterrupt)
    summary.update(status="interrupted" if stopped else "failed", error=f"{type(e).__name__}: {e}")
    if not isinstance(e, ConfigError) and not stopped:
        summary["traceback"] = traceback.format_exc()
    if recorder is not None and recorder.rows:
        summary.update(run_summary(recorder, t_start))
    write_json(run_dir / "summary.json", summary)


def _cross_entropy(state: RunState, batch: Experience, x: torch.Tensor, out: torch.Tensor):
    return F.cross_entropy(out, batch.y)
