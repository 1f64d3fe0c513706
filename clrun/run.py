"""The training procedure, top to bottom: build five things from config, then for each
experience train, let the strategy's components do their part, evaluate on the whole test stream,
and checkpoint. Components are called at the hooks listed in :mod:`clrun.components`; nothing in
this file knows any method by name.

:func:`run` is the entry point (the CLI and the tests call it); :func:`train` is the loop. With
continual unlearning, :func:`run` also trains the reference run after it (see
:mod:`clrun.unlearning`).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from clrun import checkpoint, distributed, plots, unlearning
from clrun.api import CallableModule
from clrun.benchmarks import Experience
from clrun.components import Components, RunState, adapt
from clrun.config import (
    build,
    build_model,
    check_objective,
    resolve_device,
    set_deterministic,
    validate,
)
from clrun.errors import TrainingDiverged
from clrun.io import flatten
from clrun.loggers import Loggers, NoLogger, logger_nodes
from clrun.metrics import Recorder, Work
from clrun.outcome import Outcome, closing_lines, run_title
from clrun.preemption import StopSignal

log = logging.getLogger("clrun")


def run(cfg: DictConfig, run_dir: str | Path, choices: dict | None = None) -> dict:
    """Run one experiment into ``run_dir`` and return its summary.

    A run directory that already holds a completed run is left as it is (its summary is
    returned) unless ``resume=false``. With continual unlearning and ``unlearning.reference:
    auto``, the reference run (the same config, never trained on the forgotten experiences)
    follows in ``<run_dir>/reference`` and the two final models are compared."""
    run_dir = Path(run_dir)
    done = Outcome.completed(run_dir) if cfg.get("resume", "auto") is not False else None
    if done is not None:  # the same config, or a one-line error that leaves the run as it is
        checkpoint.check_same_config(checkpoint.saved_config(run_dir), cfg)
    else:
        done = train(cfg, run_dir, choices)
    reference = unlearning.reference_dir(cfg, run_dir, done)
    if reference is not None:
        if cfg.unlearning.reference == "auto" and Outcome.completed(reference) is None:
            log.info("training the reference model (no forgotten experiences) in %s", reference)
            train(unlearning.reference_config(cfg), reference, choices)
        done = unlearning.compare_with_reference(cfg, run_dir, reference)
    log.info(closing_lines(done, run_dir))
    return done


def train(cfg: DictConfig, run_dir: Path, choices: dict | None = None) -> dict:
    """The loop: train on every experience of the stream, evaluate after each, checkpoint.
    A failure or an interruption is written to ``summary.json`` before it propagates."""
    outcome = Outcome(run_dir, choices, cfg.get("seed"))
    with outcome:
        # --- settings: validate everything before building anything ---
        validate(cfg)
        # one process, or one of a group started by torchrun / SLURM (clrun.distributed)
        device = distributed.setup(cfg, resolve_device(cfg.device))
        outcome.summary["world_size"] = distributed.world_size()
        if cfg.get("threads"):
            torch.set_num_threads(cfg.threads)
        set_deterministic(bool(cfg.get("deterministic")))
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)  # the minibatch order

        # --- build: benchmark, model, buffer, strategy components, optimiser ---
        benchmark = build(cfg.benchmark, "benchmark").to(device)
        check_objective(cfg, benchmark)
        model = build_model(cfg, benchmark, device)  # fits the benchmark's input to the model
        model = distributed.prepare_model(cfg, model, device)  # SyncBatchNorm in a group
        if cfg.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        if cfg.get("compile"):
            model.compile()  # in place: state_dict keys and deepcopy stay as they are
        buffer = build(cfg.buffer, "buffer", seed=cfg.seed) if cfg.get("buffer") else None
        components = Components(
            {
                name: build(node, f"strategy.components.{name}", buffer=buffer, seed=cfg.seed)
                for name, node in (cfg.strategy.get("components") or {}).items()
                if node is not None
            }
        )
        if buffer is not None and not components.uses(buffer):
            outcome.buffer_unused(cfg)  # an override of it is an error or a warning
            buffer = None
        plan = unlearning.plan(cfg, len(benchmark.test_stream), components)
        # a factory; one parameter group per learning-rate multiple components ask for
        make_optimizer = components.optimizer_factory(build(cfg.optimizer, "optimizer"), model)
        s = cfg.strategy
        state = RunState(
            model,
            benchmark,
            device,
            batch_size=s.batch_size,
            precision=cfg.get("precision", "fp32"),
            channels_last=bool(cfg.get("channels_last")),
            buffer=buffer,
            lr_schedule=build(cfg.lr_schedule, "lr_schedule") if cfg.get("lr_schedule") else None,
        )
        state.optimizer = make_optimizer(model.parameters())
        # one column per test experience; wall time counted from the start of this process
        recorder = outcome.recorder = Recorder(run_dir, len(benchmark.test_stream), outcome.t0)
        work = Work()  # steps, samples, seconds since the last evaluation
        logger = NoLogger()
        # the config goes flat: no nested _target_ for Hydra to build; in a group, rank 0 logs
        if cfg.get("logger") and distributed.rank() == 0:
            config = flatten(OmegaConf.to_container(cfg, resolve=True))
            logger = Loggers(  # logger=[tensorboard,wandb]: each chosen one
                build(node, key, run_dir=str(run_dir), run_config=config)
                for key, node in logger_nodes(cfg.logger).items()
            )
        outcome.logger = logger

        def save(next_experience: int, position: dict | None = None) -> None:
            saved = checkpoint.capture(
                cfg, state, components, recorder, gen, work, next_experience, position
            )
            checkpoint.save(run_dir, saved)  # in a group, rank 0 writes
            distributed.saved(saved)  # and the others wait for it

        def evaluate_streams() -> tuple[list[dict], list[dict] | None]:
            """The test stream, and the validation stream if the benchmark holds one out."""
            test = evaluate(state, components, s.eval_batch_size)
            if not benchmark.validation_stream:
                return test, None
            return test, evaluate(state, components, s.eval_batch_size, benchmark.validation_stream)

        # --- resume from a checkpoint, or evaluate the untrained model (the FWT baseline) ---
        start, position = 0, None
        saved = checkpoint.load_for_resume(cfg, run_dir, device)
        if saved is not None:
            start, position = checkpoint.restore(
                saved, state, components, recorder, gen, work, make_optimizer
            )
            where = f"experience {start}, step {state.step}"
            log.info("resumed from %s at %s", checkpoint.FILE, where)
        else:
            recorder.record(-1, *evaluate_streams())

        # --- from here on, SIGTERM / SIGINT finish the step, checkpoint and stop ---
        stop = outcome.stop = StopSignal()
        every_n = OmegaConf.select(cfg, "checkpoint.every_n_steps")

        def on_step(where: Callable[[], dict]) -> None:
            # in a group, every process stops after the same step (one all-reduce)
            if distributed.agree_to_stop(stop) or (every_n and state.step % every_n == 0):
                save(state.experience, where())
                stop.hand_over()  # if a signal came

        # --- the stream: train on each experience, evaluate, checkpoint ---
        for exp in benchmark.train_stream[start:]:
            state.experience = exp.index
            if benchmark.origin(exp.index) in plan.exclude:
                # a reference run: the experience's units exist but are never trained
                state.optimizer = adapt(model, exp, state.optimizer, make_optimizer)
            else:
                data = exp
                for hook in components["train_data"]:
                    data = hook(state, data)
                if position is None:  # not resuming inside this experience
                    for hook in components["pre_update"]:
                        hook(state, exp)
                    reset = state.reset_optimizer or cfg.optimizer.get("reset_each_experience")
                    state.optimizer = adapt(model, data, state.optimizer, make_optimizer, reset)
                    state.reset_optimizer = False
                t0 = time.perf_counter()
                steps, samples, losses = train_experience(
                    state, data, components, gen, s, on_step, position
                )
                for hook in components["post_update"]:
                    hook(state, exp)
                if state.reset_optimizer:  # a post_update replaced the model (FOSTER's compression)
                    state.optimizer = adapt(model, data, state.optimizer, make_optimizer, True)
                    state.reset_optimizer = False
                work.add(steps, samples, losses, time.perf_counter() - t0)
                logger.log_steps(state.step - steps, losses)
            position = None

            if benchmark.ends_experience(exp.index):  # online streams: once per original one
                i = benchmark.origin(exp.index)
                t0 = time.perf_counter()
                results, validation = evaluate_streams()
                lr = state.optimizer.param_groups[0]["lr"]  # for train.csv
                params = sum(p.numel() for p in model.parameters())  # grows with the model
                recorder.add_timing(i, work.take(), time.perf_counter() - t0, lr, params)
                recorder.record(i, results, validation)
                checkpoint.keep_model(cfg, run_dir, i, state)  # checkpoint.keep=every_experience
                timing = recorder.timings[-1]
                logger.log_experience(i, results, timing, recorder.acc_matrix, validation)
                log.info(recorder.progress(i))
                if plan.active and i in plan.requests:

                    def evaluate_now() -> list[dict]:
                        return evaluate(state, components, s.eval_batch_size)

                    forget = plan.requests[i]
                    unlearning.handle_request(state, components, recorder, i, forget, evaluate_now)
            save(exp.index + 1)
            distributed.agree_to_stop(stop)
            stop.hand_over()

        # --- the results: summary.json, plots, the closing lines ---
        summary = outcome.complete(device, unlearning.summary(plan, recorder, components))
        formats = OmegaConf.select(cfg, "plots.format", default=["png"])
        plots.plot_run(run_dir, recorder.acc_matrix, run_title(summary), formats)
        if plan.active:
            unlearning.plot(run_dir, recorder, summary, formats)
        logger.close(summary)
        return summary


def train_experience(
    state: RunState,
    data: Experience,
    components: Components,
    gen: torch.Generator,
    s: DictConfig,
    on_step: Callable,
    resume_at: dict | None = None,
) -> tuple[int, int, torch.Tensor]:
    """Train on one experience: ``s.epochs`` passes over ``data`` in seeded random order, or
    exactly ``s.iterations`` minibatch steps if set. ``resume_at`` continues a checkpointed
    position inside the experience. Returns (steps, samples seen, the loss of every step)."""
    n, bs, model, device = len(data), s.batch_size, state.model, state.device
    if n == 0:
        return 0, 0, torch.zeros(0)
    steps_per_epoch = math.ceil(n / bs)
    total = s.iterations or s.epochs * steps_per_epoch
    loss_fn = components.provider("loss") or _cross_entropy
    # the model on the whole minibatch: alone, the model itself; in a group, DDP on this
    # process's slice, the logits of the others gathered (clrun.distributed.DataParallel)
    forward = distributed.DataParallel(state)
    losses = torch.zeros(total, device=device)  # read once, at the end: no per-step host sync
    step, samples = (resume_at["step"], resume_at["samples"]) if resume_at else (0, 0)
    if resume_at:
        losses[:step] = resume_at["losses"]
    model.train()
    quiet = not sys.stderr.isatty()
    bar = tqdm(
        total=total, initial=step, desc=f"experience {data.index + 1}", disable=quiet, leave=False
    )
    while step < total:
        # --- an epoch: its learning rate and its seeded order ---
        if state.lr_schedule is not None:
            state.lr_schedule.apply(state.optimizer, step // steps_per_epoch)
        epoch_start = resume_at["gen_state"] if resume_at else gen.get_state()
        gen.set_state(epoch_start)
        order = torch.randperm(n, generator=gen).to(device, non_blocking=True)
        first, resume_at = (resume_at["offset"] if resume_at else 0), None
        for i in range(first, n, bs):
            if step == total:
                break
            # --- one step: replay mix → forward → loss + penalties → backward → step ---
            batch = data.subset(order[i : i + bs])
            for hook in components["replay"]:
                batch = hook(state, batch)
            x = state.model_input(batch.x, batch.e, train=True)
            with state.autocast():
                out = forward(x, batch.t)
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

            # --- bookkeeping: the step's loss, the progress bar, a checkpoint if one is due ---
            losses[step] = loss.detach()
            step, samples, state.step = step + 1, samples + len(batch), state.step + 1
            bar.update()

            def position(g=epoch_start, i=i, step=step, samples=samples) -> dict:
                done = losses[:step].clone()
                return {
                    "gen_state": g,
                    "offset": i + bs,
                    "step": step,
                    "samples": samples,
                    "losses": done,
                }

            on_step(position)
    bar.close()
    _check_finite(losses, state.step - total, data.index)
    return step, samples, losses


@torch.inference_mode()
def evaluate(
    state: RunState,
    components: Components,
    batch_size: int,
    stream: list[Experience] | None = None,
) -> list[dict]:
    """Accuracy, mean loss and task-IL accuracy on every experience of ``stream`` (default: the
    test stream). A component's ``predict`` replaces the model's logits; its
    ``predict_experience``, if it has one, scores a whole experience at once (from the frozen-
    feature cache: a frozen backbone's test embeddings are computed once per run). Task-IL
    accuracy comes from the same logits restricted to the classes of the sample's experience (None where the
    benchmark has no task structure): one forward pass, two argmaxes. Counts stay on the device
    until the end. In a group of processes each evaluates its shard of every experience and the
    counts are summed."""
    model, benchmark = state.model, state.benchmark
    stream = benchmark.test_stream if stream is None else stream
    task_classes = benchmark.task_classes
    predict = components.provider("predict")
    # a classifier on cached embeddings of a frozen backbone scores a whole experience at once
    predict_all = getattr(getattr(predict, "__self__", None), "predict_experience", None)
    was_training = model.training
    model.eval()
    sums = []
    for exp in stream:
        correct = torch.zeros((), device=state.device)
        task_correct = torch.zeros((), device=state.device)
        loss = torch.zeros((), device=state.device)
        if task_classes is not None:
            own = torch.zeros(benchmark.n_classes, dtype=torch.bool, device=state.device)
            own[task_classes[exp.index]] = True
        scores = predict_all(state, exp) if predict_all else None
        part = distributed.shard(len(exp))
        for i in range(part.start, part.stop, batch_size):
            j = min(i + batch_size, part.stop)
            y, t = exp.y[i:j], exp.t[i:j]
            if scores is not None:
                out = scores[i:j]
            else:
                x = state.model_input(exp.x[i:j], exp.e[i:j])
                with state.autocast():
                    out = predict(state, x, t) if predict else model(x, t)
            correct += (out.argmax(1) == y).sum()
            loss += F.cross_entropy(out.float(), y, reduction="sum")
            if task_classes is not None:
                within = out.float().masked_fill(~own[: out.shape[1]], -math.inf)
                task_correct += (within.argmax(1) == y).sum()
        sums.append(torch.stack([correct, loss, task_correct]))
    model.train(was_training)
    values = distributed.sum_over_ranks(torch.stack(sums)).tolist() if sums else []
    return [
        {
            "acc": c / len(exp),
            "loss": lo / len(exp),
            "task_acc": tc / len(exp) if task_classes is not None else None,
            "n": len(exp),
        }
        for (c, lo, tc), exp in zip(values, stream, strict=True)
    ]


def _check_finite(losses: torch.Tensor, first_step: int, experience: int) -> None:
    """A NaN or infinite loss stops the run (one host sync per experience)."""
    bad = torch.nonzero(~torch.isfinite(losses)).flatten().tolist()
    if bad:
        raise TrainingDiverged(
            f"the training loss became {losses[bad[0]].item()} at step {first_step + bad[0] + 1}"
            f" of the run (experience {experience}); lower optimizer.lr or check the data"
        )


def _cross_entropy(state: RunState, batch: Experience, x: torch.Tensor, out: torch.Tensor):
    return F.cross_entropy(out, batch.y)


# `clrun.run(cfg)` runs an experiment although `clrun.run` is this module: see clrun.api
sys.modules[__name__].__class__ = CallableModule
