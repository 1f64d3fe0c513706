"""Experiment loggers (``logger=tensorboard`` | ``mlflow`` | ``wandb``, or several at once:
``logger=[tensorboard,wandb]``; none by default).

The runner calls a logger at three points, never inside a training step:

- ``log_steps(first_step, losses)`` after each training pass over an experience, with the
  per-step training losses (kept on the device during the pass, so logging costs nothing per step);
- ``log_experience(i, results, timing, acc_matrix, validation=None)`` after each evaluation:
  ``results`` holds one dict per test experience (``acc``, ``loss``, ``n``, and ``task_acc``, the
  task-IL accuracy, or None without task structure), ``validation`` the same for the validation
  stream (None without a validation split), ``timing`` the experience's costs, ``acc_matrix`` the
  accuracy matrix so far. :func:`experience_metrics` names what every logger records of them;
- ``close(summary)`` at the end, successful or not: final metrics, hyperparameters, artifacts.

Each ``conf/logger/<name>.yaml`` is placed at ``logger.<name>`` (``# @package logger.<name>``), so
that several options of the group compose; :class:`Loggers` calls each chosen logger in turn.
TensorBoard and MLflow need the ``loggers`` extra, W&B the ``wandb`` extra; choosing one without
it is a one-line error before training.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from clrun.io import flatten

SCALARS = ("final_avg_acc", "avg_incremental_acc", "forgetting", "bwt", "fwt", "wall_time_s")
# the final metrics that also exist for the validation stream and for task-IL accuracy
STREAM_SCALARS = ("final_avg_acc", "avg_incremental_acc", "forgetting", "bwt", "fwt")
WANDB_MODES = ("online", "offline", "disabled")
# the groups of experience_metrics' names (``<group>/exp<j>``, ``<group>/average_seen``, ...)
EXPERIENCE_GROUPS = (
    *("accuracy", "task_accuracy", "test_loss", "time"),
    *("val_accuracy", "val_task_accuracy", "val_loss"),
)


def _require(module: str, option: str, extra: str = "loggers"):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(
            f'logger.{option} needs {module.split(".")[0]} ({e}): pip install -e ".[{extra}]"'
        ) from None


def logger_nodes(node) -> dict:
    """The chosen loggers' config nodes by key: ``{"logger.tensorboard": ..., "logger.wandb":
    ...}`` from ``logger: {tensorboard: {...}, wandb: {...}}`` (the options of conf/logger/), or
    ``{"logger": node}`` for a single node with a ``_target_`` (a user's own option written
    without the package header). A logger set to null is left out."""
    if not node:
        return {}
    if "_target_" in node:
        return {"logger": node}
    return {f"logger.{name}": sub for name, sub in node.items() if sub is not None}


def final_scalars(summary: dict) -> dict[str, float]:
    """The summary's final metrics that are set: test, ``val_`` and ``task_`` variants."""
    keys = [*SCALARS, *(f"{p}{k}" for p in ("val_", "task_") for k in STREAM_SCALARS)]
    return {k: summary[k] for k in keys if isinstance(summary.get(k), int | float)}


def experience_metrics(
    i: int, results: list[dict], timing: dict, validation: list[dict] | None = None
) -> dict[str, float]:
    """What the loggers record after experience ``i``: ``accuracy/exp<j>`` and
    ``accuracy/average_seen`` (the mean over experiences 0..i), ``test_loss/exp<j>``,
    ``task_accuracy/...`` where the results have task-IL accuracy, the same with ``val_`` for the
    validation stream, and ``time/train_s``, ``time/eval_s``."""
    out: dict[str, float] = {}
    for prefix, loss, stream in (("", "test_loss", results), ("val_", "val_loss", validation)):
        for kind, key in (("accuracy", "acc"), ("task_accuracy", "task_acc")):
            values = [r.get(key) for r in stream or []]
            if not values or any(v is None for v in values):
                continue
            out.update({f"{prefix}{kind}/exp{j}": v for j, v in enumerate(values)})
            out[f"{prefix}{kind}/average_seen"] = sum(values[: i + 1]) / (i + 1)
        out.update({f"{loss}/exp{j}": r["loss"] for j, r in enumerate(stream or [])})
    out["time/train_s"] = timing["train_s"]
    out["time/eval_s"] = timing["eval_s"]
    return out


class NoLogger:
    """What the runner calls when no logger is chosen: nothing."""

    def log_steps(self, first_step: int, losses: Tensor) -> None:
        pass

    def log_experience(
        self, i: int, results: list[dict], timing: dict, acc_matrix, validation=None
    ) -> None:
        pass

    def close(self, summary: dict) -> None:
        pass


class Loggers:
    """Several loggers as one (``logger=[tensorboard,wandb]``): each call goes to each, in the
    order chosen. ``close`` runs once and closes every logger even if one of them fails (the
    first failure is raised after), since the runner calls it again when a run fails."""

    def __init__(self, loggers) -> None:
        self.loggers = list(loggers)
        self.closed = False

    def log_steps(self, first_step: int, losses: Tensor) -> None:
        for logger in self.loggers:
            logger.log_steps(first_step, losses)

    def log_experience(
        self, i: int, results: list[dict], timing: dict, acc_matrix, validation=None
    ) -> None:
        for logger in self.loggers:
            if validation is None:  # a user's logger written before validation existed works
                logger.log_experience(i, results, timing, acc_matrix)
            else:
                logger.log_experience(i, results, timing, acc_matrix, validation)

    def close(self, summary: dict) -> None:
        if self.closed:
            return
        self.closed = True
        failure = None
        for logger in self.loggers:
            try:
                logger.close(summary)
            except Exception as e:  # noqa: BLE001 - the others still flush their files
                failure = failure or e
        if failure is not None:
            raise failure


class TensorBoardLogger:
    """Event files in ``<run dir>/tensorboard`` (or ``log_dir``): ``train/loss`` per step,
    :func:`experience_metrics` per experience, the accuracy matrix as an image, and the
    flattened config as hparams with the final metrics."""

    def __init__(self, run_dir: str, run_config: dict, log_dir: str | None = None):
        tb = _require("torch.utils.tensorboard", "tensorboard")
        self.writer = tb.SummaryWriter(log_dir or str(Path(run_dir) / "tensorboard"))
        self.config = flatten(run_config)

    def log_steps(self, first_step: int, losses: Tensor) -> None:
        for k, v in enumerate(losses.tolist()):
            self.writer.add_scalar("train/loss", v, first_step + k + 1)

    def log_experience(
        self, i: int, results: list[dict], timing: dict, acc_matrix, validation=None
    ) -> None:
        for name, value in experience_metrics(i, results, timing, validation).items():
            self.writer.add_scalar(name, value, i)
        from clrun.plots import heatmap

        self.writer.add_figure("acc_matrix", heatmap(acc_matrix, f"after experience {i + 1}"), i)

    def close(self, summary: dict) -> None:
        hparams = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in self.config.items()
            if v is not None
        }
        metrics = {f"final/{k}": v for k, v in final_scalars(summary).items()}
        if metrics:
            self.writer.add_hparams(hparams, metrics, run_name=".")
        self.writer.close()


def mlflow_name(metric: str) -> str:
    """MLflow's names for :func:`experience_metrics`: ``accuracy/exp0`` → ``acc_exp0``,
    ``val_accuracy/average_seen`` → ``average_seen_val_acc``, ``time/train_s`` → ``train_s``."""
    group, what = metric.split("/")
    group = group.replace("accuracy", "acc")
    if group == "time":
        return what
    return f"average_seen_{group}" if what == "average_seen" else f"{group}_{what}"


class MLflowLogger:
    """One MLflow run per clrun run: params = the flattened config, metrics per step and per
    experience, the final metrics, and the run directory (without the checkpoint) as artifacts.
    ``tracking_uri``: a SQLite store by default (``sqlite:///mlflow.db`` in the directory clrun
    is started from), or any MLflow URI."""

    def __init__(
        self,
        run_dir: str,
        run_config: dict,
        tracking_uri: str = "sqlite:///mlflow.db",
        experiment: str = "clrun",
        run_name: str | None = None,
    ):
        self.mlflow = _require("mlflow", "mlflow")
        self.run_dir = Path(run_dir)
        self.mlflow.set_tracking_uri(tracking_uri)
        self.mlflow.set_experiment(experiment)
        self.run = self.mlflow.start_run(run_name=run_name or self.run_dir.name)
        params = {k: str(v)[:500] for k, v in flatten(run_config).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.mlflow.log_params(dict(items[i : i + 100]))

    def log_steps(self, first_step: int, losses: Tensor) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric("train_loss", v, now, first_step + k + 1) for k, v in enumerate(losses.tolist())
        ]
        client = self.mlflow.tracking.MlflowClient()
        for i in range(0, len(metrics), 1000):
            client.log_batch(self.run.info.run_id, metrics=metrics[i : i + 1000])

    def log_experience(
        self, i: int, results: list[dict], timing: dict, acc_matrix, validation=None
    ) -> None:
        metrics = experience_metrics(i, results, timing, validation)
        self.mlflow.log_metrics({mlflow_name(k): v for k, v in metrics.items()}, step=i)

    def close(self, summary: dict) -> None:
        self.mlflow.log_metrics(final_scalars(summary))
        for f in sorted(self.run_dir.iterdir()):
            if f.is_file():
                self.mlflow.log_artifact(str(f))
        hydra = self.run_dir / ".hydra"
        if hydra.is_dir():
            self.mlflow.log_artifacts(str(hydra), ".hydra")
        self.mlflow.end_run("FINISHED" if summary.get("status") == "completed" else "FAILED")


class WandbLogger:
    """One Weights & Biases run per clrun run: config = the flattened config; ``train/loss``
    against ``train/step`` (the optimiser step); :func:`experience_metrics` against
    ``experience``; the final metrics and the status in the run's summary; the run directory's
    plots (PNG) as images at the end. ``mode``: online | offline (``wandb sync`` later) |
    disabled; null = ``$WANDB_MODE``, else online. W&B's console capture is off: the run's log is
    ``run.log``. A resumed clrun run starts a new W&B run of the same name."""

    def __init__(
        self,
        run_dir: str,
        run_config: dict,
        project: str = "clrun",
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        mode: str | None = None,
        name: str | None = None,
        dir: str | None = None,  # noqa: A002 - wandb.init's own name for it
    ):
        self.wandb = _require("wandb", "wandb", extra="wandb")
        self.run_dir = Path(run_dir)
        self.run = self.wandb.init(
            project=project,
            entity=entity,
            group=group,
            tags=list(tags) if tags else None,
            mode=mode,
            name=name or self.run_dir.name,
            dir=str(dir or run_dir),
            config=flatten(run_config),
            settings=self.wandb.Settings(console="off"),
        )
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")
        self.run.define_metric("experience")
        for metrics in EXPERIENCE_GROUPS:
            self.run.define_metric(f"{metrics}/*", step_metric="experience")

    def log_steps(self, first_step: int, losses: Tensor) -> None:
        for k, v in enumerate(losses.tolist()):
            self.run.log({"train/loss": v, "train/step": first_step + k + 1})

    def log_experience(
        self, i: int, results: list[dict], timing: dict, acc_matrix, validation=None
    ) -> None:
        self.run.log({"experience": i, **experience_metrics(i, results, timing, validation)})

    def close(self, summary: dict) -> None:
        self.run.summary.update({"status": summary.get("status"), **final_scalars(summary)})
        plots = sorted(self.run_dir.glob("*.png"))
        if plots:
            self.run.log({f"plots/{p.stem}": self.wandb.Image(str(p)) for p in plots})
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)
