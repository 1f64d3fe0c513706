"""The tables of ``clrun-report`` (:mod:`clrun.report`): which metrics a report shows and how
each is judged, and the text of ``report.md``, ``report.tex``, ``report.csv`` and ``runs.csv``.

Plain Python and the csv module: no pandas, no torch. The numbers are summary.json's fields;
a dotted key reads a nested one (``unlearning.final_retained_acc``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

# summary.json field → column title, in table order
TEST_METRICS = {
    "final_avg_acc": "final avg acc",
    "avg_incremental_acc": "avg incremental acc",
    "forgetting": "forgetting",
    "bwt": "BWT",
    "fwt": "FWT",
}
COST_METRICS = {
    "wall_time_s": "wall time (s)",
    "train_time_s": "train time (s)",
    "eval_time_s": "eval time (s)",
    "samples_per_s": "samples/s",
    "peak_rss_mb": "peak RSS (MB)",
    "peak_gpu_mem_mb": "peak GPU memory (MB)",
}
TABLE_METRICS = ("final_avg_acc", "forgetting", "bwt", "fwt")  # the report's columns
UNLEARNING_METRICS = {  # added when runs unlearned (dotted: inside summary.json's "unlearning")
    "unlearning.final_forgotten_acc": "forgotten acc",
    "unlearning.final_retained_acc": "retained acc",
    "unlearning.reference.mean_js_divergence": "JS to reference",
}
STREAMS = {"val_": "val", "task_": "task-IL"}  # prefixes of the other streams' metrics


def title(key: str) -> str:
    """A metric's column title: ``val_forgetting`` → ``forgetting (val)``."""
    for prefix, stream in STREAMS.items():
        if key.startswith(prefix):
            return f"{title(key.removeprefix(prefix))} ({stream})"
    return {**TEST_METRICS, **COST_METRICS, **UNLEARNING_METRICS}.get(key, key)


def better(key: str) -> str | None:
    """Which way a metric improves: ``higher`` (accuracies, BWT, FWT, throughput), ``lower``
    (forgetting, times, memory) or None (the unlearning measures: judged against a
    reference, not by size)."""
    base = key.removeprefix("val_").removeprefix("task_")
    if base == "forgetting" or key.endswith("_time_s") or key.startswith("peak_"):
        return "lower"
    if base in TEST_METRICS or key == "samples_per_s":
        return "higher"
    return None


def metric(summary: dict, key: str) -> float | None:
    """A field of summary.json; a dotted key reads nested fields (None where missing)."""
    value = summary
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _has(summaries: list[dict], key: str) -> bool:
    return any(metric(s, key) is not None for s in summaries)


def metrics_of(summaries: list[dict]) -> dict[str, str]:
    """The report table's columns (key → title): each CL metric with its validation twin
    before it when runs have one, task-IL accuracy when runs have it, the wall time, and the
    unlearning measures when a run unlearned."""
    columns = {}
    val = _has(summaries, "val_final_avg_acc")
    for key in TABLE_METRICS:
        if val and _has(summaries, f"val_{key}"):
            columns[f"val_{key}"] = title(f"val_{key}")
            columns[key] = f"{title(key)} (test)"
        else:
            columns[key] = title(key)
        if key == "final_avg_acc" and _has(summaries, "task_final_avg_acc"):
            columns["task_final_avg_acc"] = "task-IL acc"
    columns["wall_time_s"] = title("wall_time_s")
    if any((s.get("unlearning") or {}).get("events") for s in summaries):
        columns.update(UNLEARNING_METRICS)
    return columns


def scalar_metrics(summaries: list[dict]) -> list[str]:
    """Every metric some summary has as a number, in runs.csv's order: test, validation,
    task-IL, times and memory, unlearning."""
    keys = dict.fromkeys(
        [
            *TEST_METRICS,
            *(f"val_{k}" for k in TEST_METRICS),
            *sorted(k for s in summaries for k in s if k.startswith("val_")),
            *(f"task_{k}" for k in TEST_METRICS),
            *sorted(k for s in summaries for k in s if k.startswith("task_")),
            *COST_METRICS,
            *UNLEARNING_METRICS,
        ]
    )
    return [k for k in keys if _has(summaries, k)]


def setting_text(value) -> str:
    """A setting as a label or a CSV cell shows it: null for None, lists and dicts as JSON."""
    if value is None:
        return "null"
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _digits(key: str) -> int:
    return 1 if key.endswith("_time_s") or key in COST_METRICS else 3


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


# ------------------------------------------------------------------ report.md


def markdown(
    runs: list, rows: list[dict], dirs: list[Path], out: Path, plots: list[str], shared: list[str]
) -> str:
    done = [r for r in runs if r.status == "completed"]
    columns = metrics_of([r.summary for r in done])
    lines = [
        "# clrun report",
        "",
        f"{len(runs)} runs in {', '.join(map(str, dirs))}: {len(done)} completed, "
        f"{len(runs) - len(done)} not completed. Each cell: mean ± sample std (ddof=1) over the "
        "group's completed runs (runs that differ only in seed); n runs.",
    ]
    if shared:
        lines += ["", f"Every run: `{' '.join(shared)}`."]
    lines += [
        "",
        "| group | n | " + " | ".join(columns.values()) + " |",
        "| --- | ---: |" + " ---: |" * len(columns),
    ]
    for row in rows:
        cells = [_fmt(*row[k][:2], _digits(k)) for k in columns]
        lines.append(f"| {row['group']} | {row['n']} | " + " | ".join(cells) + " |")
    lines += ["", "One row per run: runs.csv. The table in LaTeX: report.tex.", ""]
    lines += _plot_links(plots)
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


# ------------------------------------------------------------------ report.tex

_LATEX = {
    "\\": r"\textbackslash{}",
    "_": r"\_",
    "%": r"\%",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """``text`` as LaTeX prints it literally (``strategy=er_ace`` → ``strategy=er\\_ace``)."""
    return "".join(_LATEX.get(c, c) for c in text)


def best_rows(rows: list[dict], key: str) -> set[int]:
    """The rows holding the column's best mean (all of them on a tie); none for a column
    without a direction, with fewer than two values, or where every row shows the same number."""
    direction = better(key)
    means = {
        i: round(row[key][0], _digits(key))
        for i, row in enumerate(rows)
        if not math.isnan(row[key][0])
    }
    if direction is None or len(set(means.values())) < 2:
        return set()
    best = (max if direction == "higher" else min)(means.values())
    return {i for i, m in means.items() if m == best}


def latex(rows: list[dict], columns: dict[str, str]) -> str:
    """The report's table as a booktabs ``tabular``: cells ``$mean \\pm std$``, the best mean
    per column in bold (as rounded: equal numbers are equally bold)."""
    bold = {key: best_rows(rows, key) for key in columns}
    lines = [
        "% clrun-report: mean \\pm sample std (ddof=1) over seeds; best per column in bold.",
        "% Needs \\usepackage{booktabs}.",
        "\\begin{tabular}{lr" + "r" * len(columns) + "}",
        "\\toprule",
        " & ".join(["group", "$n$", *(latex_escape(t) for t in columns.values())]) + " \\\\",
        "\\midrule",
    ]
    for i, row in enumerate(rows):
        cells = [latex_escape(row["group"]), str(row["n"])]
        for key in columns:
            mean, std, _ = row[key]
            d = _digits(key)
            if math.isnan(mean):
                cells.append("--")
                continue
            number = f"{mean:.{d}f}" if math.isnan(std) else f"{mean:.{d}f} \\pm {std:.{d}f}"
            cells.append(f"$\\mathbf{{{number}}}$" if i in bold[key] else f"${number}$")
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ report.csv and runs.csv


def _csv(header: list[str], rows: Iterable[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def groups_csv(rows: list[dict]) -> str:
    """report.csv: one row per group, ``<metric>_mean``, ``_std``, ``_n`` per column."""
    columns = [k for k in rows[0] if k not in ("group", "n")] if rows else list(TABLE_METRICS)
    header = ["group", "n"] + [f"{k}_{s}" for k in columns for s in ("mean", "std", "n")]
    return _csv(header, ([r["group"], r["n"]] + [v for k in columns for v in r[k]] for r in rows))


def runs_csv(runs: list, out: Path, settings: list[str], grouping) -> str:
    """runs.csv: one row per run (``run``, ``status``, ``group``, the ``settings`` columns,
    every scalar metric of the completed runs); a run that did not complete has its settings
    and empty metrics. Missing values are empty cells (NaN in pandas)."""
    done = [r for r in runs if r.status == "completed"]
    metrics = scalar_metrics([r.summary for r in done])

    def row(r) -> list:
        values = [setting_text(r.settings[k]) if k in r.settings else "" for k in settings]
        completed = r.status == "completed"
        scores = [metric(r.summary, k) if completed else None for k in metrics]
        label = grouping.label(r)
        cells = [os.path.relpath(r.dir, out), r.status, label, *values]
        return cells + ["" if v is None else repr(v) for v in scores]

    return _csv(["run", "status", "group", *settings, *metrics], map(row, runs))
