"""Continual-learning metrics over the accuracy matrix, and the recorder that writes them.

R[i][j] is the accuracy on test experience j after training on experiences 0..i; b[j] is the
accuracy of the untrained model on experience j. With T experiences:

- final average accuracy  = mean_j R[T-1][j]
- average incremental acc = mean_i ( mean_{j<=i} R[i][j] )          (Rebuffi et al. 2017)
- forgetting              = mean_{j<T-1} ( max_{i<T-1} R[i][j] - R[T-1][j] )   (Chaudhry et al. 2018)
- BWT                     = mean_{j<T-1} ( R[T-1][j] - R[j][j] )     (Lopez-Paz & Ranzato 2017)
- FWT                     = mean_{j>0} ( R[j-1][j] - b[j] )          (Lopez-Paz & Ranzato 2017)

Forgetting, BWT and FWT are None for a single experience. All accuracies are fractions in [0, 1].

The same definitions give the validation metrics (``val_*``: the matrix of the validation stream,
``benchmark.validation``) and the task-IL metrics (``task_*``: the matrix of task-IL accuracies,
the logits restricted to the classes of the sample's experience, on benchmarks with task
structure).

The :class:`Recorder` rewrites, after each evaluation, ``metrics.jsonl`` (one record per
evaluation of an experience), ``acc_matrix.csv`` (R) and ``train.csv``: one row per row of R with
the training work since the previous one (``experience``, ``steps``, ``samples``,
``train_loss_mean``, ``train_loss_last``, ``train_s``, ``eval_s``, ``samples_per_s``, ``lr`` (the
optimiser's first parameter group's at the end of the experience), ``rss_mb``, ``params``: the
model's parameter count after the experience, which grows for model-growing methods). All three come
from the recorder's checkpointed state, so a resumed run rewrites them whole.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import numpy as np

from clrun.io import write_atomic

METRICS = ("final_avg_acc", "avg_incremental_acc", "forgetting", "bwt", "fwt")
# what ``optimize`` may name: every metric on the test stream, the validation stream, task-IL
OBJECTIVES = tuple(p + m for p in ("", "val_", "task_") for m in METRICS)


def final_avg_acc(R: np.ndarray) -> float:
    return float(R[-1].mean())


def avg_incremental_acc(R: np.ndarray) -> float:
    return float(np.mean([R[i, : i + 1].mean() for i in range(len(R))]))


def forgetting(R: np.ndarray) -> float | None:
    T = len(R)
    if T < 2:
        return None
    return float(np.mean([R[: T - 1, j].max() - R[T - 1, j] for j in range(T - 1)]))


def bwt(R: np.ndarray) -> float | None:
    T = len(R)
    if T < 2:
        return None
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def fwt(R: np.ndarray, b: np.ndarray) -> float | None:
    T = len(R)
    if T < 2:
        return None
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def summarize(R: np.ndarray, b: np.ndarray) -> dict[str, float | None]:
    return {
        "final_avg_acc": final_avg_acc(R),
        "avg_incremental_acc": avg_incremental_acc(R),
        "forgetting": forgetting(R),
        "bwt": bwt(R),
        "fwt": fwt(R, b),
    }


class Recorder:
    """Collects evaluation rows and timings; writes metrics.jsonl and acc_matrix.csv as it goes
    (each rewrite is atomic, so a crash never leaves half a file)."""

    def __init__(self, run_dir: Path, n_experiences: int, started: float | None = None):
        self.run_dir = Path(run_dir)
        self.T = n_experiences
        self.initial: list[dict] = []  # evaluation of the untrained model (FWT baseline)
        self.rows: list[list[dict]] = []  # rows[i][j]: after training through experience i
        self.val_initial: list[dict] = []  # the same on the validation stream, if there is one
        self.val_rows: list[list[dict]] = []
        self.timings: list[dict] = []  # per experience: steps, samples, losses, seconds, lr
        self.unlearned: list[dict] = []  # evaluations right after an unlearning request
        self.started = started or time.perf_counter()  # when this process started the run
        self.earlier_wall_s = 0.0  # wall time of the processes before a resume

    @property
    def wall_time_s(self) -> float:
        """Seconds the run has taken so far, summed over the processes that resumed it."""
        return self.earlier_wall_s + time.perf_counter() - self.started

    def record(
        self, trained_through: int, results: list[dict], validation: list[dict] | None = None
    ) -> None:
        """The evaluation after training through experience ``trained_through`` (-1: the
        untrained model) on the test stream, and on the validation stream if there is one."""

        def rows(stream: str, res: list[dict]) -> list[dict]:
            return [
                {"trained_through": trained_through, "eval_exp": j, "stream": stream, **r}
                for j, r in enumerate(res)
            ]

        test = rows("test", results)
        val = rows("validation", validation) if validation is not None else None
        if trained_through < 0:
            self.initial, self.val_initial = test, val or []
        else:
            self.rows.append(test)
            if val is not None:
                self.val_rows.append(val)
        self.flush()

    def add_timing(
        self,
        experience: int,
        work: dict,
        eval_s: float,
        lr: float | None = None,
        params: int | None = None,
    ) -> None:
        """The costs of one experience: its training ``work`` (:meth:`Work.take`), the seconds
        its evaluation took, the learning rate at its end, the model's parameter count and the
        process's memory now."""
        self.timings.append(
            {
                "experience": experience,
                **work,
                "eval_s": eval_s,
                "lr": lr,
                "rss_mb": current_rss_mb(),
                "params": params,
            }
        )

    def progress(self, i: int) -> str:
        """One log line after experience ``i``: its training work and the accuracy on seen."""
        w, seen = self.timings[-1], [r["acc"] for r in self.rows[-1][: i + 1]]
        trained = (
            f"{w['steps']} steps in {w['train_s']:.1f}s, loss {w['train_loss']:.4f}"
            if w["steps"]
            else f"no training step ({w['train_s']:.1f}s)"
        )
        return (
            f"experience {i + 1}/{self.T}: {trained}, accuracy on seen {sum(seen) / len(seen):.4f}"
        )

    def record_unlearning(
        self, after: int, forgotten: list[int], results: list[dict], seconds: float, info: dict
    ) -> None:
        """The evaluation right after forgetting ``forgotten`` (requested after experience
        ``after``): rows of ``metrics.jsonl`` with ``"event": "unlearned"``."""
        self.unlearned.append(
            {
                "after_experience": after,
                "forgotten": list(forgotten),
                "results": results,
                "seconds": seconds,
                **info,
            }
        )
        self.flush()

    def final(self) -> list[dict]:
        """The last evaluation of the run: after the last experience, or after an unlearning
        request made right then."""
        if self.unlearned and self.unlearned[-1]["after_experience"] == len(self.rows) - 1:
            return self.unlearned[-1]["results"]
        return self.rows[-1]

    @property
    def acc_matrix(self) -> np.ndarray:
        return _matrix(self.rows, "acc", self.T)

    @property
    def baseline(self) -> np.ndarray:
        return np.array([r["acc"] for r in self.initial], dtype=float)

    @property
    def val_acc_matrix(self) -> np.ndarray | None:
        """R on the validation stream; None without a validation split."""
        return _matrix(self.val_rows, "acc", self.T) if self.val_rows else None

    @property
    def task_acc_matrix(self) -> np.ndarray | None:
        """Task-IL R on the test stream; None where the benchmark has no task structure."""
        if not self.rows or self.rows[0][0].get("task_acc") is None:
            return None
        return _matrix(self.rows, "task_acc", self.T)

    def summaries(self) -> dict:
        """The metrics of every matrix the run has: test, ``val_`` and ``task_`` prefixed."""
        out = summarize(self.acc_matrix, self.baseline)
        if (V := self.val_acc_matrix) is not None:
            b = np.array([r["acc"] for r in self.val_initial], dtype=float)
            out.update({f"val_{k}": v for k, v in summarize(V, b).items()})
        if (A := self.task_acc_matrix) is not None:
            b = np.array([r["task_acc"] for r in self.initial], dtype=float)
            out.update({f"task_{k}": v for k, v in summarize(A, b).items()})
        return out

    def flush(self) -> None:
        timeline = [self.initial]
        for i, row in enumerate(self.rows):
            timeline.append(row)
            for u in self.unlearned:
                if u["after_experience"] == i:
                    timeline.append(
                        [
                            {
                                "trained_through": i,
                                "eval_exp": j,
                                "event": "unlearned",
                                "forgotten": u["forgotten"],
                                **r,
                            }
                            for j, r in enumerate(u["results"])
                        ]
                    )
        if self.val_initial:  # after each test row, the validation row of the same point
            val = [self.val_initial, *self.val_rows]
            timeline = [r for row in timeline for r in (row, *_same_point(row, val))]
        lines = [json.dumps(r) for row in timeline for r in row]
        write_atomic(self.run_dir / "metrics.jsonl", "\n".join(lines) + "\n")
        for name, R in (
            ("acc_matrix.csv", self.acc_matrix if self.rows else None),
            ("val_acc_matrix.csv", self.val_acc_matrix),
            ("task_acc_matrix.csv", self.task_acc_matrix),
        ):
            if R is not None:
                header = ",".join(f"exp{j}" for j in range(self.T))
                body = "\n".join(",".join(f"{a:.6f}" for a in row) for row in R)
                write_atomic(self.run_dir / name, header + "\n" + body + "\n")
        if self.timings:
            write_atomic(self.run_dir / "train.csv", train_csv(self.timings))

    def state_dict(self) -> dict:
        return {
            "initial": self.initial,
            "rows": self.rows,
            "timings": self.timings,
            "unlearned": self.unlearned,
            "wall_time_s": self.wall_time_s,
            "val_initial": self.val_initial,
            "val_rows": self.val_rows,
        }

    def load_state_dict(self, state: dict) -> None:
        self.initial, self.rows, self.timings = state["initial"], state["rows"], state["timings"]
        self.unlearned = state.get("unlearned", [])
        self.val_initial, self.val_rows = state.get("val_initial", []), state.get("val_rows", [])
        self.earlier_wall_s = state.get("wall_time_s", 0.0)
        self.started = time.perf_counter()


def _matrix(rows: list[list[dict]], key: str, T: int) -> np.ndarray:
    return np.array([[r[key] for r in row] for row in rows], dtype=float).reshape(-1, T)


def _same_point(test_row: list[dict], val_rows: list[list[dict]]) -> list[list[dict]]:
    """The validation row evaluated at the same point as ``test_row`` (none for the rows
    written right after an unlearning request)."""
    if test_row and test_row[0].get("event") == "unlearned":
        return []
    i = test_row[0]["trained_through"] if test_row else -2
    return [row for row in val_rows if row and row[0]["trained_through"] == i]


class Work:
    """Training work since the last evaluation (several mini-experiences in an online stream)."""

    def __init__(self) -> None:
        self.steps, self.samples, self.loss_sum, self.train_s = 0, 0, 0.0, 0.0
        self.last_loss = float("nan")  # of the last step

    def add(self, steps: int, samples: int, losses, seconds: float) -> None:
        """One training pass: its step count, samples, per-step losses (a tensor), seconds."""
        self.steps, self.samples = self.steps + steps, self.samples + samples
        self.train_s += seconds
        if steps:
            self.loss_sum += float(losses.sum())
            self.last_loss = float(losses[steps - 1])

    def take(self) -> dict:
        mean = self.loss_sum / self.steps if self.steps else float("nan")
        out = {
            "steps": self.steps,
            "samples": self.samples,
            "train_s": self.train_s,
            "train_loss": mean,
            "train_loss_last": self.last_loss,
        }
        self.__init__()
        return out


TRAIN_CSV = (
    *("experience", "steps", "samples", "train_loss_mean", "train_loss_last"),
    *("train_s", "eval_s", "samples_per_s", "lr", "rss_mb", "params"),
)


def train_csv(timings: list[dict]) -> str:
    """``train.csv``: one row per evaluation point (the columns of :data:`TRAIN_CSV`); an empty
    cell where a value is unknown (the learning rate or the last loss of a checkpoint written
    before they were recorded, samples/s of an experience not trained on)."""

    def cell(v) -> str:
        return "" if v is None or v != v else repr(v)  # v != v: NaN

    lines = [",".join(TRAIN_CSV)]
    for t in timings:
        row = {
            **t,
            "train_loss_mean": t["train_loss"],
            "train_loss_last": t.get("train_loss_last"),
            "lr": t.get("lr"),
            "params": t.get("params"),
            "samples_per_s": t["samples"] / t["train_s"] if t["train_s"] else None,
        }
        lines.append(",".join(cell(row[k]) for k in TRAIN_CSV))
    return "\n".join(lines) + "\n"


def current_rss_mb() -> float:
    """Resident memory of this process now (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_summary(recorder: Recorder, device=None) -> dict:
    """The metrics and costs of a run so far, for summary.json."""
    import torch

    import clrun

    R, timings = recorder.acc_matrix, recorder.timings
    train_s = sum(t["train_s"] for t in timings)
    out = {
        **recorder.summaries(),
        "experiences_done": len(R),
        "steps": sum(t["steps"] for t in timings),
        "wall_time_s": recorder.wall_time_s,
        "train_time_s": train_s,
        "eval_time_s": sum(t["eval_s"] for t in timings),
        "samples_per_s": sum(t["samples"] for t in timings) / train_s if train_s else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # the model's size after each experience (model growth, which papers report)
        "params_per_experience": [t.get("params") for t in timings],
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
