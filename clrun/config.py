"""Config checks and the one place that builds objects from config.

``validate(cfg)`` runs before anything is built: every generic key (sizes, rates, choices) is
checked against a rule, and every ``_target_`` node against its target's signature, so a typo or
an out-of-range value fails in a second with one line naming the key, the value and what is
allowed. ``build(node, key, **run_objects)`` instantiates a node and turns a constructor's
``ValueError`` into the same kind of message.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from clrun.benchmarks import NAMED_CLASS_ORDERS, SCENARIOS
from clrun.checkpoint import KEEP
from clrun.checks import (
    Rule,
    boolean,
    int_at_least,
    is_int,
    not_allowed,
    number_above,
    number_at_least,
    number_in,
    one_of,
    optional,
    probability_below_one,
)
from clrun.errors import ConfigError
from clrun.loggers import WANDB_MODES, logger_nodes
from clrun.metrics import OBJECTIVES
from clrun.models import HEADS
from clrun.plots import FORMATS

RESERVED = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Keys the runner reads itself: never passed to a target's constructor.
RUNNER_KEYS = {"optimizer": {"reset_each_experience"}}


# key → (check, what is allowed). Applied when the key exists in the composed config.
RULES: dict[str, Rule] = {
    "seed": int_at_least(0),
    "threads": optional(int_at_least(1)),
    "device": Rule(
        lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None,
        "auto, cpu, cuda, cuda:N or mps",
    ),
    "resume": Rule(
        lambda v: v in (True, False, "auto") or (isinstance(v, str) and v != ""),
        "auto, true, false or the path of a run directory",
    ),
    "checkpoint.every_n_steps": optional(int_at_least(1)),
    "checkpoint.keep": one_of(KEEP),
    "precision": one_of(("fp32", "bf16")),
    "compile": boolean(),
    "deterministic": boolean(),
    "channels_last": boolean(),
    "benchmark.scenario": one_of(SCENARIOS),
    "benchmark.n_experiences": int_at_least(1),
    "benchmark.seed": int_at_least(0),
    "benchmark.class_order": Rule(
        lambda v: (
            v is None
            or (isinstance(v, str) and v in NAMED_CLASS_ORDERS)
            or (isinstance(v, list | ListConfig) and all(is_int(c) for c in v))
        ),
        "null, a list of integer class labels or " + " | ".join(NAMED_CLASS_ORDERS),
    ),
    "model.head": one_of(HEADS),
    "model.dropout": probability_below_one(),
    "model.hidden_sizes": Rule(
        lambda v: isinstance(v, list | ListConfig) and all(is_int(h) and h >= 1 for h in v),
        "a list of integers ≥ 1",
    ),
    "strategy.epochs": int_at_least(1),
    "strategy.iterations": optional(int_at_least(1)),
    "strategy.batch_size": int_at_least(1),
    "strategy.eval_batch_size": int_at_least(1),
    "optimizer.lr": number_above(0),
    "optimizer.momentum": probability_below_one(),
    "optimizer.weight_decay": number_at_least(0),
    "optimizer.reset_each_experience": boolean(),
    "buffer.max_size": int_at_least(1),
    "benchmark.validation": number_in(0, 1, open_hi=True),
    "optimize": optional(one_of(OBJECTIVES), "null (the validation metric when there is one)"),
    "logger.wandb.mode": optional(one_of(WANDB_MODES), "null ($WANDB_MODE, else online)"),
    "plots.format": Rule(
        lambda v: isinstance(v, list) and all(f in FORMATS for f in v),
        "a list of " + " | ".join(FORMATS) + ", e.g. [png,pdf]; [] for no plots",
    ),
}

_MISSING = object()


def objective(cfg: DictConfig) -> str:
    """The summary field a run returns to a sweeper (``optimize``): as set, else the validation
    final average accuracy when the benchmark holds out a validation split, else the test one.
    A validation or task-IL metric the run cannot have is a ConfigError."""
    name = cfg.get("optimize") or (
        "val_final_avg_acc"
        if OmegaConf.select(cfg, "benchmark.validation", default=0)
        else "final_avg_acc"
    )
    if name.startswith("val_") and not OmegaConf.select(cfg, "benchmark.validation", default=0):
        raise ConfigError(
            f"optimize={name} needs a validation split: set benchmark.validation (e.g. 0.1)"
        )
    return name


def check_objective(cfg: DictConfig, benchmark) -> None:
    """A task-IL ``optimize`` needs a benchmark with task structure (checked once it is built)."""
    name = objective(cfg)
    if name.startswith("task_") and benchmark.task_classes is None:
        raise ConfigError(
            f"optimize={name}: benchmark {benchmark.name} ({benchmark.scenario} scenario) has no "
            "task structure, so no task-IL accuracy; optimize a class-IL metric"
        )


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first key that breaks a rule or does not fit its target."""
    for key, (check, allowed) in RULES.items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if not check(value):
            raise ConfigError(not_allowed(key, value, allowed))
    objective(cfg)
    _check_strategy_keys_are_read(cfg)
    for group in ("benchmark", "model", "optimizer", "buffer", "lr_schedule"):
        if cfg.get(group) is not None:
            check_signature(cfg[group], group)
    for name, node in (cfg.strategy.get("components") or {}).items():
        if node is not None:
            check_signature(node, f"strategy.components.{name}")
    for key, node in logger_nodes(cfg.get("logger")).items():
        check_signature(node, key)


def build_model(cfg: DictConfig, benchmark, device):
    """The model of ``cfg.model`` for ``benchmark``'s inputs and classes, on ``device``; a model
    that takes its own input (a pre-trained backbone's size and normalisation) makes the
    benchmark's batches fit it."""
    shape = {"input_shape": benchmark.input_shape, "n_classes": benchmark.n_classes}
    model = build(cfg.model, "model", **shape).to(device)
    try:
        benchmark.fit_input(getattr(model, "input_spec", None))
    except ValueError as e:
        raise ConfigError(f"model={cfg.model.get('_target_', '?')}: {e}") from None
    return model


# strategy keys the runner reads itself; every other strategy key must feed a component
RUNNER_STRATEGY_KEYS = {"epochs", "iterations", "batch_size", "eval_batch_size", "components"}


def _check_strategy_keys_are_read(cfg: DictConfig) -> None:
    """A strategy key that neither the runner nor any ``${strategy.<key>}`` interpolation reads
    would be ignored (a preset or a user's YAML naming a key the strategy does not have)."""
    strategy = cfg.get("strategy")
    if not isinstance(strategy, DictConfig):
        return
    text: list[str] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, str):
            text.append(v)

    walk(OmegaConf.to_container(cfg, resolve=False))
    read = set(re.findall(r"\$\{strategy\.([A-Za-z_0-9]+)", " ".join(text)))
    unread = sorted(set(strategy) - RUNNER_STRATEGY_KEYS - read)
    if unread:
        keys = sorted((set(strategy) - {"components"}) - set(unread))
        raise ConfigError(
            f"strategy.{unread[0]}={OmegaConf.select(strategy, unread[0])}: no component of this "
            f"strategy reads it, so it would be ignored; the strategy's keys: {', '.join(keys)}"
        )


def resolve_device(name: str):
    """``auto`` → cuda if available, else cpu; a named device must exist."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} is not available on this machine: use auto or cpu")
    return device


def set_deterministic(on: bool) -> None:
    """``deterministic=true``: deterministic kernels where torch has them (cuDNN convolutions,
    cuBLAS with a fixed workspace, index and scatter sums), so that a GPU run repeats bit for bit
    and a resumed one equals an uninterrupted one; a warning names any op that has none. CPU
    runs are deterministic either way. Set per run: in-process runs do not leak it to the next."""
    import os

    import torch

    if on:  # read when cuBLAS makes its first handle: before the first matrix product
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)


def check_signature(node: DictConfig, key: str) -> Callable:
    """The node's keys must be parameters of its ``_target_``."""
    if "_target_" not in node:
        raise ConfigError(f"{key} has no _target_: name the class or function that builds it")
    try:
        target = get_object(node._target_)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"{key}._target_={node._target_!r} cannot be imported: {e}") from None
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return target
    own = RUNNER_KEYS.get(key, set())
    for k in node:
        if k in RESERVED or k in own or k in params:
            continue
        allowed = sorted(
            set(params)
            - {"self", "buffer", "seed", "input_shape", "n_classes", "run_dir", "run_config"}
        )
        close = difflib.get_close_matches(str(k), allowed, n=1)
        hint = f" (did you mean {key}.{close[0]}?)" if close else ""
        raise ConfigError(
            f"{key}.{k}={node[k]!r} is not a parameter of {node._target_}{hint}; "
            f"allowed keys: {', '.join(allowed)}"
        )
    return target


def build(node: DictConfig, key: str, **run_objects: Any) -> Any:
    """Instantiate ``node``. Run-level objects (the buffer, the seed, the input shape, ...) are
    passed to the target when its signature takes them and the config does not set them.
    A ValueError/TypeError from the constructor becomes a ConfigError naming ``key``."""
    target = check_signature(node, key)
    params = inspect.signature(target).parameters
    extra = {k: v for k, v in run_objects.items() if k in params and k not in node}
    drop = RUNNER_KEYS.get(key, set()) & set(node)
    if drop:
        node = OmegaConf.masked_copy(node, [k for k in node if k not in drop])
    try:
        return instantiate(node, **extra, _convert_="all")
    except InstantiationException as e:
        cause = e.__cause__ or e
        if not isinstance(cause, ValueError | TypeError):
            raise cause from None  # e.g. a dataset that cannot be obtained: its own message
        message = str(cause) if str(cause).startswith(key) else f"{key}: {cause}"
        raise ConfigError(message + _interpolation_hint(node, str(cause))) from None


def _interpolation_hint(node: DictConfig, message: str) -> str:
    """Point at the key the user set, e.g. strategy.alpha for components.lwf.alpha=${...}."""
    raw = OmegaConf.to_container(node, resolve=False)
    for k, v in raw.items():
        if isinstance(v, str) and v.startswith("${") and re.search(rf"\b{re.escape(k)}\b", message):
            return f" (set by {v[2:-1]})"
    return ""
