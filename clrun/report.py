"""``clrun-report``: tables and plots for papers from any number of run and sweep directories.

    clrun-report outputs/multirun/2026-11-24/10-00-00        # writes its files there
    clrun-report outputs/multirun/a outputs/multirun/b --out results/
    clrun-report SWEEP --group-by strategy                     # one row per strategy
    clrun-report SWEEP --x optimizer.lr --metric val_final_avg_acc --format png,pdf

Every folder below the given directories that holds a ``summary.json`` (or Hydra's ``.hydra/``)
is a run. After a multirun, ``clrun`` writes the report of its sweep directory itself (the
``sweep_report`` callback of ``conf/config.yaml``) and prints its path.

Groups. Completed runs are grouped by their overrides less ``seed``, ``hydra.*`` and the
run-management keys (``resume``, ``threads``, ``data_dir``, ``checkpoint``, ``logger``,
``plots``, ...): a group is one configuration over seeds. Its label names only the overrides
that differ across the runs, as typed (``strategy=replay buffer.max_size=500``; an override
every run shares, such as ``debug=default``, is listed once above the table); when nothing
differs, a label is the runs' whole override list. ``--group-by KEY,...`` groups by those keys
only (a dotted config key, ``seed``, or a config group such as ``strategy``), averaging over
everything else. Each metric is reported as mean ± sample standard deviation (ddof=1) over the
group's runs, with n. Runs that failed, were interrupted, are still running or have no summary
are listed apart, so a partial sweep reports what has finished.

Files, in ``--out`` (default: the first directory):

- ``report.md``: the table and the plots. With validation metrics (``val_*``) in the summaries,
  each test metric has its validation twin beside it; with task-IL ones (``task_*``), a column
  ``task-IL acc``.
- ``report.tex``: the same table in LaTeX (``\\usepackage{booktabs}``), cells ``$mean \\pm std$``,
  the best mean of each column in bold: the highest for accuracies, BWT, FWT and samples/s, the
  lowest for forgetting, times and memory. ``\\input{report.tex}`` inside a ``table``.
- ``report.csv``: the table, one row per group (``<metric>_mean``, ``_std``, ``_n``).
- ``runs.csv``: one row per run, the tidy table for pandas (``pd.read_csv``): the run directory
  (relative to the report), ``status`` (runs that did not complete have empty metrics), the group
  label, one column per setting that differs across the runs (the option of each config group,
  every leaf of ``.hydra/config.yaml``, overrides naming no config key), ``seed``, and every
  scalar metric some run has: test, ``val_*``, ``task_*``, times, samples/s, peak memory.
- plots, ``--format png,pdf,svg`` (default: the runs' ``plots.format``): ``final_acc`` (the
  metric of ``--metric`` per group, default ``final_avg_acc``, error bars = std),
  ``acc_curves`` (average accuracy on the experiences seen so far after each experience, mean ±
  std band), ``acc_matrices`` (each group's mean R[i][j]); a ``val_*`` or ``task_*`` metric
  draws the last two from the runs' ``val_``/``task_acc_matrix.csv``. ``--x KEY`` adds
  ``<metric>_vs_<KEY>``: the metric against a numeric hyperparameter, one curve per remaining
  group, mean ± std band over the runs at each value, a log axis when the values span more than
  a factor 100.

Reading run directories imports no torch: the report of a large sweep takes seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from clrun import tables
from clrun.io import RUN_MANAGEMENT_KEYS, flatten, top_key, write_atomic
from clrun.tables import metric, metrics_of, setting_text

NOT_A_SETTING = ("hydra", *RUN_MANAGEMENT_KEYS)
NOT_A_GROUP_KEY = ("seed", *NOT_A_SETTING)
OPTION_FIELDS = ("benchmark", "model", "strategy", "buffer", "optimizer")  # summary.json's
REFERENCE_DIR = "reference"  # a run's reference run (clrun.unlearning): part of it, not a run
DEFAULT_METRIC = "final_avg_acc"


@dataclass
class Run:
    dir: Path
    summary: dict = field(default_factory=dict)  # empty when there is no summary.json
    overrides: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:  # completed | failed | interrupted | running | missing
        return self.summary.get("status", "missing")

    @property
    def error(self) -> str:
        return (str(self.summary.get("error") or "").splitlines() or [""])[0]

    @property
    def group(self) -> str:
        """The run's configuration: its overrides less seed and run management, sorted."""
        keep = sorted(o for o in self.overrides if top_key(o) not in NOT_A_GROUP_KEY)
        return " ".join(keep) or "(no overrides)"

    @cached_property
    def config(self) -> dict:
        """``.hydra/config.yaml`` as plain containers, interpolations resolved where they can
        be (``{}`` where there is no such file)."""
        path = self.dir / ".hydra" / "config.yaml"
        if not path.exists():
            return {}
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        try:
            return OmegaConf.to_container(cfg, resolve=True) or {}
        except Exception:  # noqa: BLE001 - a resolver of Hydra's (${now:...}): keep the text
            return OmegaConf.to_container(cfg, resolve=False) or {}

    @cached_property
    def settings(self) -> dict[str, Any]:
        """What the run was made with, by dotted key: the overrides that name no config key
        (``debug=default``), the option of each config group (``strategy``), and every leaf of
        its config, less ``hydra.*`` and the run-management keys."""
        flat = {k: v for k, v in flatten(self.config).items() if top_key(k) not in NOT_A_SETTING}
        typed = override_items(self.overrides, exclude=NOT_A_SETTING)
        options = {
            g: self.summary[g] for g in OPTION_FIELDS if isinstance(self.summary.get(g), str)
        }
        if "seed" not in flat and self.summary.get("seed") is not None:
            flat["seed"] = self.summary["seed"]
        return {**{k: v for k, v in typed.items() if k not in flat}, **options, **flat}

    def plots_format(self) -> list[str]:
        """The run's ``plots.format``; the default, png, where the run does not say."""
        formats = (self.config.get("plots") or {}).get("format")
        return ["png"] if formats is None else [str(f) for f in formats]

    def acc_matrix(self, prefix: str = "") -> np.ndarray | None:
        """``<prefix>acc_matrix.csv`` (prefix ``val_`` or ``task_``: the other streams)."""
        path = self.dir / f"{prefix}acc_matrix.csv"
        return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2) if path.exists() else None


def override_items(overrides: list[str], exclude=NOT_A_GROUP_KEY) -> dict[str, str]:
    """``["+a.b=1", "seed=0"]`` → ``{"a.b": "1"}``: the overrides by key as typed, less those
    whose top-level key is in ``exclude``."""
    items = {}
    for o in overrides:
        if top_key(o) not in exclude:
            key, _, value = o.partition("=")
            items[key.lstrip("+~")] = value
    return items


def read_summary(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def find_runs(dirs: list[Path]) -> list[Run]:
    """Every run below ``dirs``, in natural path order (job 2 before job 10)."""
    found: set[Path] = set()
    for d in map(Path, dirs):
        found |= {p.parent for p in d.rglob("summary.json")}
        found |= {p.parent for p in d.rglob(".hydra") if p.is_dir()}
    found = {p for p in found if not (p.name == REFERENCE_DIR and p.parent in found)}
    runs = []
    for run_dir in sorted(
        found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]
    ):
        summary = read_summary(run_dir) or {}
        overrides = summary.get("overrides")
        if overrides is None and (run_dir / ".hydra" / "overrides.yaml").exists():
            from omegaconf import OmegaConf

            overrides = OmegaConf.to_container(
                OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
            )
        runs.append(Run(run_dir, summary, [str(o) for o in overrides or []]))
    return runs


# ------------------------------------------------------------------ groups and their labels


def differing_overrides(runs: list[Run]) -> list[str]:
    """The override keys whose value differs across ``runs`` (or that some runs lack), in the
    order they were first typed; seed and run management left out."""
    items = [override_items(r.overrides) for r in runs]
    keys = dict.fromkeys(k for it in items for k in it)
    return [k for k in keys if len({it.get(k) for it in items}) > 1]


def shared_overrides(runs: list[Run]) -> list[str]:
    """The overrides every one of ``runs`` has (``debug=default``), left out of the labels."""
    differ = set(differing_overrides(runs))
    items = override_items(runs[0].overrides) if runs else {}
    return [f"{k}={v}" for k, v in items.items() if k not in differ]


@dataclass
class Grouping:
    """How runs are labelled: by the override ``keys`` as typed, or (``--group-by``) by the
    values of those settings; ``whole``: nothing differs, a label is every override."""

    keys: list[str]
    by_settings: bool = False
    whole: bool = False

    def label(self, run: Run) -> str:
        if self.by_settings:
            parts = [f"{k}={setting_text(run.settings.get(k))}" for k in self.keys]
        else:
            items = override_items(run.overrides)
            keys = list(items) if self.whole else [k for k in self.keys if k in items]
            parts = [f"{k}={items[k]}" for k in keys]
        if parts:
            return " ".join(parts)
        return "(no overrides)" if self.whole else "(defaults)" if self.keys else "all runs"


def grouping(runs: list[Run], by: Sequence[str] | None = None, drop: str | None = None):
    """The :class:`Grouping` of ``runs``: by the keys ``by`` (a ValueError for a key no run
    has), else by the overrides that differ; ``drop``: a key left out (``--x``'s)."""
    if by:
        unknown = [k for k in by if not any(k in r.settings for r in runs)]
        if unknown and runs:
            differ = [k for k in setting_columns(runs) if k != "seed"]
            raise ValueError(
                f"--group-by {','.join(unknown)}: no run has this key; keys that differ across "
                f"the runs: {', '.join(differ) or 'none'} (and seed)"
            )
        return Grouping([k for k in by if k != drop], by_settings=True)
    keys = differing_overrides(runs)
    return Grouping([k for k in keys if k != drop], whole=not keys)


def group_runs(
    runs: list[Run], by: Sequence[str] | None = None, drop: str | None = None
) -> dict[str, list[Run]]:
    """Completed runs by group label, groups in the order their first run was found."""
    done = [r for r in runs if r.status == "completed"]
    g = grouping(done, by, drop)
    groups: dict[str, list[Run]] = {}
    for r in done:
        groups.setdefault(g.label(r), []).append(r)
    return groups


def setting_columns(runs: list[Run]) -> list[str]:
    """runs.csv's setting columns: every setting whose value differs across ``runs`` (or that
    some lack), the swept overrides first, then ``seed``."""
    typed = (k for r in runs for k in override_items(r.overrides, exclude=NOT_A_SETTING))
    keys = dict.fromkeys([*typed, *(k for r in runs for k in r.settings)])
    missing = object()

    def differs(k: str) -> bool:
        return len({setting_text(r.settings.get(k, missing)) for r in runs}) > 1

    return [k for k in keys if k != "seed" and differs(k)] + ["seed"]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def mean_std(values: list[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN for one value) and count, ignoring None."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def table_rows(groups: dict[str, list[Run]]) -> list[dict]:
    """One row per group: ``group``, ``n`` and (mean, std, n) per column of the table."""
    rows = []
    columns = metrics_of([r.summary for runs in groups.values() for r in runs])
    for name, runs in groups.items():
        row: dict = {"group": name, "n": len(runs)}
        for key in columns:
            row[key] = mean_std([metric(r.summary, key) for r in runs])
        rows.append(row)
    return rows


# ------------------------------------------------------------------ plots


def plot(
    groups: dict[str, list[Run]],
    out: Path,
    formats: Sequence[str] = ("png",),
    metric_key: str = DEFAULT_METRIC,
    curve: tuple[str, dict[str, list[Run]]] | None = None,
) -> list[str]:
    """Write the plots in each of ``formats`` (png | pdf | svg); return the file names.
    ``curve``: (KEY, groups without KEY) for ``<metric>_vs_<KEY>``. No groups or
    ``formats=[]``: nothing, matplotlib not imported."""
    from clrun import plots

    formats = plots.check_formats(formats)
    if not groups or not formats:
        return []
    prefix = next((p for p in ("val_", "task_") if metric_key.startswith(p)), "")
    figures = {
        "final_acc" if metric_key == DEFAULT_METRIC else metric_key: _bars(groups, metric_key),
        "acc_curves": _acc_curves(groups, prefix),
        "acc_matrices": _mean_acc_matrices(groups, prefix),
    }
    if curve is not None:
        key, curve_groups = curve
        points = sweep_points(curve_groups, key, metric_key)
        title = tables.title(metric_key)
        figures[f"{metric_key}_vs_{key}"] = plots.sweep_curves(points, key, title)
    return [p.name for stem, fig in figures.items() for p in plots.save(fig, out, stem, formats)]


def _bars(groups: dict[str, list[Run]], key: str = DEFAULT_METRIC):
    """One bar per group: the metric's mean, error bar = std."""
    from clrun.plots import group_bars

    stats = {g: mean_std([metric(r.summary, key) for r in runs]) for g, runs in groups.items()}
    unit = tables.better(key) == "higher" and key.endswith("acc")
    return group_bars(stats, f"{tables.title(key)} (mean ± std over seeds)", unit=unit)


def _stacked_matrices(runs: list[Run], prefix: str = "") -> np.ndarray | None:
    """The accuracy matrices of a group's runs, (runs, i, j); runs of another shape left out."""
    Rs = [R for R in (r.acc_matrix(prefix) for r in runs) if R is not None]
    if not Rs:
        return None
    shapes = [R.shape for R in Rs]
    return np.stack([R for R in Rs if R.shape == max(shapes, key=shapes.count)])


def _acc_curves(groups: dict[str, list[Run]], prefix: str = ""):
    """Average accuracy on the experiences seen so far after each experience 1..T, per group:
    mean ± std band over its runs."""
    from clrun.plots import group_curves

    curves = {}
    for name, runs in groups.items():
        Rs = _stacked_matrices(runs, prefix)
        if Rs is not None:
            curves[name] = np.array([[R[i, : i + 1].mean() for i in range(len(R))] for R in Rs])
    stream = {"val_": "validation ", "task_": "task-IL "}.get(prefix, "")
    return group_curves(curves, f"{stream}average accuracy on seen experiences")


def _mean_acc_matrices(groups: dict[str, list[Run]], prefix: str = ""):
    """One heatmap per group: the mean over its runs of R[i][j]."""
    from clrun.plots import group_matrices

    stacked = {n: _stacked_matrices(runs, prefix) for n, runs in groups.items()}
    return group_matrices({n: Rs.mean(0) for n, Rs in stacked.items() if Rs is not None})


def sweep_points(
    groups: dict[str, list[Run]], key: str, metric_key: str
) -> dict[str, dict[float, list[float]]]:
    """``--x``: per group, the metric of its runs at each numeric value of ``key`` (runs
    without both left out)."""
    points: dict[str, dict[float, list[float]]] = {}
    for name, runs in groups.items():
        for r in runs:
            x, y = _number(r.settings.get(key)), metric(r.summary, metric_key)
            if x is not None and y is not None:
                points.setdefault(name, {}).setdefault(x, []).append(y)
    return points


# ------------------------------------------------------------------ the report


def report(
    dirs: list[Path],
    out: Path | None = None,
    formats: Sequence[str] | None = None,
    group_by: Sequence[str] | None = None,
    x: str | None = None,
    metric_key: str = DEFAULT_METRIC,
) -> str:
    """Write report.md, report.tex, report.csv, runs.csv and the plots to ``out`` (default: the
    first directory); return the Markdown. A ValueError if no run is found, or for a key or
    metric no run has.

    ``formats``: the plots' file types (png | pdf | svg; [] for none). By default those the
    completed runs were made with (their ``plots.format``, in order of first appearance), so a
    sweep run with ``plots.format=[pdf]`` gets a report in PDF too. ``group_by``: the keys that
    make a group (default: the overrides that differ). ``x``: a numeric key to plot
    ``metric_key`` against."""
    dirs = [Path(d) for d in dirs]
    out = Path(out or dirs[0])
    runs = find_runs(dirs)
    if not runs:
        raise ValueError(f"no runs (summary.json or .hydra/) below {', '.join(map(str, dirs))}")
    groups = group_runs(runs, group_by)
    done = [r for rs in groups.values() for r in rs]
    curve = None
    if done:
        _check_metric(done, metric_key)
        if x is not None:
            curve = (x, group_runs(runs, group_by, drop=x))
            if not sweep_points(curve[1], x, metric_key):
                raise ValueError(f"--x {x}: no completed run has a numeric value of {x}")
    if formats is None:
        formats = list(dict.fromkeys(f for r in done for f in r.plots_format()))
    rows = table_rows(groups)
    shared = [] if group_by else shared_overrides(done)
    files = plot(groups, out, formats, metric_key, curve)
    text = tables.markdown(runs, rows, dirs, out, files, shared)
    write_atomic(out / "report.md", text)
    write_atomic(out / "report.tex", tables.latex(rows, metrics_of([r.summary for r in done])))
    write_atomic(out / "report.csv", tables.groups_csv(rows))
    labels = grouping(done, group_by)
    write_atomic(out / "runs.csv", tables.runs_csv(runs, out, setting_columns(runs), labels))
    return text


def _check_metric(runs: list[Run], key: str) -> None:
    if not any(metric(r.summary, key) is not None for r in runs):
        have = [k for k in tables.scalar_metrics([r.summary for r in runs])]
        raise ValueError(f"--metric {key}: no completed run has it; they have: {', '.join(have)}")


def sweep_report(sweep_dir: Path) -> Path | None:
    """The report of a sweep directory, for the ``sweep_report`` callback: written, its path
    printed and returned. A failure (a plot that cannot be drawn, a folder that cannot be
    written) is one warning line, never a failed sweep: the tables are then written without
    plots where they can be."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        return None
    try:
        report([sweep_dir])
    except Exception as e:  # noqa: BLE001 - the sweep's runs are done: never fail it here
        problem = f"{type(e).__name__}: {' '.join(str(e).split())}"
        try:
            report([sweep_dir], formats=[])
        except Exception:  # noqa: BLE001
            print(f"clrun: warning: no report of {sweep_dir}: {problem}", file=sys.stderr)
            return None
        print(f"clrun: warning: report of {sweep_dir} without plots: {problem}", file=sys.stderr)
    path = sweep_dir / "report.md"
    print(f"clrun: report of the sweep: {path}")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="clrun-report",
        description="Aggregate clrun run and sweep directories: mean ± std over seeds per "
        "config; report.md, report.tex, report.csv, runs.csv and plots.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument("--out", type=Path, help="folder for the files (default: DIRS[0])")

    def comma_list(v: str) -> list[str]:
        return [f for f in v.split(",") if f]

    parser.add_argument(
        "--format",
        type=comma_list,
        metavar="FMT[,FMT]",
        help="the plots' file types, comma-separated: png, pdf, svg ('' for no plots; "
        "default: the runs' plots.format)",
    )
    parser.add_argument(
        "--group-by",
        type=comma_list,
        metavar="KEY[,KEY]",
        help="group by these keys only (dotted config keys, config groups such as strategy); "
        "default: the overrides that differ across the runs",
    )
    parser.add_argument(
        "--x", metavar="KEY", help="plot --metric against this numeric key (mean ± std band)"
    )
    parser.add_argument(
        "--metric",
        default=DEFAULT_METRIC,
        help=f"the summary field the bars and --x plot (default {DEFAULT_METRIC}; "
        "val_final_avg_acc for the validation stream)",
    )
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    try:
        text = report(args.dirs, args.out, args.format, args.group_by, args.x, args.metric)
    except ValueError as e:
        parser.error(str(e))
    print(text, end="")
    print(
        f"written to {args.out or args.dirs[0]}: report.md, report.tex, report.csv, runs.csv "
        "and the plots",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
