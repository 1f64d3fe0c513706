"""Experiment loggers (``logger=tensorboard`` / ``logger=mlflow``; none by default).

The runner calls a logger at three points, never inside a training step:

- ``log_steps(first_step, losses)`` after each training pass over an experience, with the
  per-step training losses (kept on the device during the pass, so logging costs nothing per step);
- ``log_experience(i, results, timing, acc_matrix)`` after each evaluation: accuracy and loss on
  every test experience, the average over those seen, times, and the accuracy matrix so far;
- ``close(summary)`` at the end, successful or not: final metrics, hyperparameters, artifacts.

Both need the ``loggers`` extra (``pip install -e ".[loggers]"``); selecting one without it is a
clear error before training.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from clrun.io import flatten

SCALARS = ("final_avg_acc", "avg_incremental_acc", "forgetting", "bwt", "fwt", "wall_time_s")


def _require(module: str, option: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ValueError(
            f'logger={option} needs {module.split(".")[0]} ({e}): pip install -e ".[loggers]"'
        ) from None


def _average_seen(results: list[dict], i: int) -> float:
    return sum(r["acc"] for r in results[: i + 1]) / (i + 1)


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


class TensorBoardLogger:
    """Event files in ``<run dir>/tensorboard`` (or ``log_dir``): ``train/loss`` per step,
    ``accuracy/exp<j>``, ``accuracy/average_seen`` and times per experience, the accuracy matrix
    as an image, and the flattened config as hparams with the final metrics."""

    def __init__(self, run_dir: str, run_config: dict, log_dir: str | None = None):
        tb = _require("torch.utils.tensorboard", "tensorboard")
        self.writer = tb.SummaryWriter(log_dir or str(Path(run_dir) / "tensorboard"))
        self.config = flatten(run_config)

    def log_steps(self, first_step: int, losses: Tensor) -> None:
        for k, v in enumerate(losses.tolist()):
            self.writer.add_scalar("train/loss", v, first_step + k + 1)

    def log_experience(self, i: int, results: list[dict], timing: dict, acc_matrix) -> None:
        for j, r in enumerate(results):
            self.writer.add_scalar(f"accuracy/exp{j}", r["acc"], i)
            self.writer.add_scalar(f"test_loss/exp{j}", r["loss"], i)
        self.writer.add_scalar("accuracy/average_seen", _average_seen(results, i), i)
        self.writer.add_scalar("time/train_s", timing["train_s"], i)
        self.writer.add_scalar("time/eval_s", timing["eval_s"], i)
        from clrun.plots import heatmap

        self.writer.add_figure("acc_matrix", heatmap(acc_matrix, f"after experience {i + 1}"), i)

    def close(self, summary: dict) -> None:
        hparams = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in self.config.items()
            if v is not None
        }
        metrics = {f"final/{k}": summary[k] for k in SCALARS if summary.get(k) is not None}
        if metrics:
            self.writer.add_hparams(hparams, metrics, run_name=".")
        self.writer.close()


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

    def log_experience(self, i: int, results: list[dict], timing: dict, acc_matrix) -> None:
        metrics = {f"acc_exp{j}": r["acc"] for j, r in enumerate(results)}
        metrics.update(average_seen_acc=_average_seen(results, i), train_s=timing["train_s"])
        self.mlflow.log_metrics(metrics, step=i)

    def close(self, summary: dict) -> None:
        self.mlflow.log_metrics({k: summary[k] for k in SCALARS if summary.get(k) is not None})
        for f in sorted(self.run_dir.iterdir()):
            if f.is_file():
                self.mlflow.log_artifact(str(f))
        hydra = self.run_dir / ".hydra"
        if hydra.is_dir():
            self.mlflow.log_artifacts(str(hydra), ".hydra")
        self.mlflow.end_run("FINISHED" if summary.get("status") == "completed" else "FAILED")
