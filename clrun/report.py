"""``clrun-report``: one table and three plots from any number of run and sweep directories.

    clrun-report outputs/multirun/2026-11-24/10-00-00        # writes report.md/.csv/*.png there
    clrun-report outputs/multirun/a outputs/multirun/b --out results/

Every folder below the given directories that holds a ``summary.json`` (or Hydra's ``.hydra/``)
is a run. Completed runs are grouped by their overrides less ``seed``, ``hydra.*`` and the
run-management keys (``resume``, ``threads``, ``data_dir``, ``checkpoint``): a group is one
configuration over seeds. Each metric is reported as mean ± sample standard deviation (ddof=1)
over the group's runs, with n. Runs that failed, were interrupted, are still running or have no
summary are listed apart, so a partial sweep reports what has finished.

Plots: ``final_acc`` (final average accuracy per group, error bars = std), ``acc_curves``
(average accuracy on the experiences seen so far after each experience, mean ± std band) and
``acc_matrices`` (each group's mean accuracy matrix R[i][j], drawn as a run's heatmap is), as
``.png`` by default: ``--format png,pdf,svg`` (or the runs' ``plots.format``) picks the types.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clrun.io import RUN_MANAGEMENT_KEYS, top_key, write_atomic

NOT_A_GROUP_KEY = ("seed", "hydra", *RUN_MANAGEMENT_KEYS)
METRICS = {  # summary.json field → column title
    "final_avg_acc": "final avg acc",
    "forgetting": "forgetting",
    "bwt": "BWT",
    "fwt": "FWT",
    "wall_time_s": "wall time (s)",
}
UNLEARNING_METRICS = {  # added when runs unlearned (dotted: inside summary.json's "unlearning")
    "unlearning.final_forgotten_acc": "forgotten acc",
    "unlearning.final_retained_acc": "retained acc",
    "unlearning.reference.mean_js_divergence": "JS to reference",
}
REFERENCE_DIR = "reference"  # a run's reference run (clrun.unlearning): part of it, not a run


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
        keep = sorted(o for o in self.overrides if top_key(o) not in NOT_A_GROUP_KEY)
        return " ".join(keep) or "(no overrides)"

    def plots_format(self) -> list[str]:
        """The run's ``plots.format`` (its ``.hydra/config.yaml``); the default, png, where the
        run does not say."""
        path = self.dir / ".hydra" / "config.yaml"
        if path.exists():
            from omegaconf import OmegaConf

            formats = OmegaConf.select(OmegaConf.load(path), "plots.format", default=None)
            if formats is not None:
                return [str(f) for f in formats]
        return ["png"]

    def acc_matrix(self) -> np.ndarray | None:
        path = self.dir / "acc_matrix.csv"
        return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2) if path.exists() else None


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


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Completed runs by group, groups in the order their first run was found."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.status == "completed":
            groups.setdefault(r.group, []).append(r)
    return groups


def mean_std(values: list[float | None]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (ddof=1; NaN for one value) and count, ignoring None."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def metric(summary: dict, key: str) -> float | None:
    """A field of summary.json; a dotted key reads nested fields (None where missing)."""
    value = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, int | float) else None


def metrics_of(runs: list[Run]) -> dict[str, str]:
    """The table's columns: the CL metrics, and the unlearning ones if any run unlearned."""
    unlearned = any(r.summary.get("unlearning", {}).get("events") for r in runs)
    return {**METRICS, **(UNLEARNING_METRICS if unlearned else {})}


def table_rows(groups: dict[str, list[Run]]) -> list[dict]:
    rows = []
    columns = metrics_of([r for runs in groups.values() for r in runs])
    for name, runs in groups.items():
        row: dict = {"group": name, "n": len(runs)}
        for key in columns:
            row[key] = mean_std([metric(r.summary, key) for r in runs])
        rows.append(row)
    return rows


def markdown(
    runs: list[Run], rows: list[dict], dirs: list[Path], out: Path, plots: list[str]
) -> str:
    done = sum(r.status == "completed" for r in runs)
    columns = metrics_of([r for r in runs if r.status == "completed"])
    lines = [
        "# clrun report",
        "",
        f"{len(runs)} runs in {', '.join(map(str, dirs))}: {done} completed, "
        f"{len(runs) - done} not completed. Each cell: mean ± sample std (ddof=1) over the "
        "group's completed runs (runs that differ only in seed); n runs.",
        "",
        "| group | n | " + " | ".join(columns.values()) + " |",
        "| --- | ---: |" + " ---: |" * len(columns),
    ]
    for row in rows:
        cells = [_fmt(*row[k][:2], 1 if k == "wall_time_s" else 3) for k in columns]
        lines.append(f"| {row['group']} | {row['n']} | " + " | ".join(cells) + " |")
    lines += [""] + _plot_links(plots)
    bad = [r for r in runs if r.status != "completed"]
    if bad:
        lines += ["", "## Runs that did not complete", "", "| run | status | overrides | error |"]
        lines.append("| --- | --- | --- | --- |")
        for r in bad:
            where = os.path.relpath(r.dir, out)
            error = r.error.replace("|", "\\|")
            lines.append(f"| {where} | {r.status} | {' '.join(r.overrides)} | {error} |")
    return "\n".join(lines) + "\n"


def _plot_links(files: list[str]) -> list[str]:
    """Markdown for the plot files: each plot shown once (its PNG, else its SVG), its other
    files linked (a PDF cannot be shown inline)."""
    lines = []
    for f in files:
        stem = f.rsplit(".", 1)[0]
        inline = next((f"{stem}.{t}" for t in ("png", "svg") if f"{stem}.{t}" in files), None)
        lines.append(f"![{f}]({f})" if f == inline else f"[{f}]({f})")
    return lines


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    columns = [k for k in rows[0] if k not in ("group", "n")] if rows else list(METRICS)
    writer.writerow(["group", "n"] + [f"{k}_{s}" for k in columns for s in ("mean", "std", "n")])
    for row in rows:
        writer.writerow([row["group"], row["n"]] + [v for k in columns for v in row[k]])
    write_atomic(path, buf.getvalue())


def plot(groups: dict[str, list[Run]], out: Path, formats: Sequence[str] = ("png",)) -> list[str]:
    """Write the three plots in each of ``formats`` (``plots.format``: png | pdf | svg); return
    the file names. No groups or ``formats=[]``: nothing, matplotlib not imported."""
    from clrun import plots

    formats = plots.check_formats(formats)
    if not groups or not formats:
        return []
    figures = {
        "final_acc": _final_acc_bars(groups),
        "acc_curves": _acc_curves(groups),
        "acc_matrices": _mean_acc_matrices(groups),
    }
    return [p.name for stem, fig in figures.items() for p in plots.save(fig, out, stem, formats)]


def _final_acc_bars(groups: dict[str, list[Run]]):
    """One bar per group: mean final average accuracy, error bar = std."""
    from clrun.plots import figure

    stats = [mean_std([r.summary.get("final_avg_acc") for r in runs]) for runs in groups.values()]
    fig = figure((7, 1.0 + 0.4 * len(groups)))
    ax = fig.subplots()
    xerr = [0 if math.isnan(s) else s for _, s, _ in stats]
    ax.barh(range(len(groups)), [m for m, _, _ in stats], xerr=xerr, capsize=4)
    labels = [f"{g} (n={n})" for g, (_, _, n) in zip(groups, stats, strict=True)]
    ax.set_yticks(range(len(groups)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("final average accuracy (mean ± std over seeds)")
    return fig


def _stacked_matrices(runs: list[Run]) -> np.ndarray | None:
    """The accuracy matrices of a group's runs, (runs, i, j); runs of another shape left out."""
    Rs = [R for R in (r.acc_matrix() for r in runs) if R is not None]
    if not Rs:
        return None
    shapes = [R.shape for R in Rs]
    return np.stack([R for R in Rs if R.shape == max(shapes, key=shapes.count)])


def _acc_curves(groups: dict[str, list[Run]]):
    """Average accuracy on the experiences seen so far after each experience 1..T: mean ± std
    band over the group's runs; the legend right of the axes."""
    from clrun.plots import figure, legend_right

    fig = figure((9, 4.5))
    ax = fig.subplots()
    for name, runs in groups.items():
        Rs = _stacked_matrices(runs)
        if Rs is None:
            continue
        curves = np.array([[R[i, : i + 1].mean() for i in range(len(R))] for R in Rs])
        x, mean = np.arange(1, curves.shape[1] + 1), curves.mean(0)
        (line,) = ax.plot(x, mean, marker="o", label=f"{name} (n={len(Rs)})")
        if len(Rs) > 1:
            std = curves.std(0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
        ax.set_xticks(x)
    ax.set_xlabel("trained through experience")
    ax.set_ylabel("average accuracy on seen experiences")
    ax.set_ylim(0, 1.02)
    if ax.get_legend_handles_labels()[1]:
        legend_right(ax)
    return fig


def _mean_acc_matrices(groups: dict[str, list[Run]]):
    """One heatmap per group: the mean over its runs of R[i][j], drawn as a run's heatmap is
    (experiences 1..T, the cells of experiences not yet trained on grey)."""
    from clrun.plots import draw_matrix, figure

    shown = [
        (n, Rs.mean(0))
        for n, Rs in ((n, _stacked_matrices(r)) for n, r in groups.items())
        if Rs is not None
    ]
    cols = max(1, min(4, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig = figure((3.6 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(shown) :]:
        ax.axis("off")
    for ax, (name, R) in zip(axes.flat, shown, strict=False):
        draw_matrix(ax, R, fontsize=6)
        ax.set_title(name, fontsize=8)
        ax.xaxis.label.set_fontsize(7)
        ax.yaxis.label.set_fontsize(7)
    return fig


def report(dirs: list[Path], out: Path | None = None, formats: Sequence[str] | None = None) -> str:
    """Write report.md, report.csv and the plots to ``out`` (default: the first directory);
    return the Markdown. A ValueError if no run is found.

    ``formats``: the plots' file types (png | pdf | svg; [] for none). By default those the
    completed runs were made with (their ``plots.format``, in order of first appearance), so a
    sweep run with ``plots.format=[pdf]`` gets a report in PDF too."""
    dirs = [Path(d) for d in dirs]
    out = Path(out or dirs[0])
    runs = find_runs(dirs)
    if not runs:
        raise ValueError(f"no runs (summary.json or .hydra/) below {', '.join(map(str, dirs))}")
    groups = group_runs(runs)
    rows = table_rows(groups)
    if formats is None:
        done = [r for runs in groups.values() for r in runs]
        formats = list(dict.fromkeys(f for r in done for f in r.plots_format()))
    text = markdown(runs, rows, dirs, out, plot(groups, out, formats))
    write_atomic(out / "report.md", text)
    write_csv(rows, out / "report.csv")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="clrun-report",
        description="Aggregate clrun run and sweep directories: mean ± std over seeds per config.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep directories")
    parser.add_argument(
        "--out", type=Path, help="folder for report.md, report.csv and the plots (default: DIRS[0])"
    )
    parser.add_argument(
        "--format",
        type=lambda v: [f for f in v.split(",") if f],
        metavar="FMT[,FMT]",
        help="the plots' file types, comma-separated: png, pdf, svg ('' for no plots; "
        "default: the runs' plots.format)",
    )
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        parser.error(f"not a directory: {', '.join(missing)}")
    try:
        print(report(args.dirs, args.out, args.format), end="")
    except ValueError as e:
        parser.error(str(e))
    print(
        f"written to {args.out or args.dirs[0]}: report.md, report.csv and the plots",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
