"""Plots of a run, drawn with matplotlib: the accuracy matrix as a heatmap, the accuracy on each
experience over time, the unlearning timeline, and the figures of ``clrun-report`` (groups of
runs: bars, curves, mean heatmaps, a metric against a hyperparameter).

``plots.format`` (conf/config.yaml) lists the file types to write: ``png``, ``pdf``, ``svg``, one
file per plot and type (``acc_matrix.pdf``, ...). ``[]`` writes none, and then matplotlib is not
even imported: it costs a run ~0.45 s (importing it ~0.3 s, the two figures ~0.13 s).

matplotlib is imported lazily, inside the functions that draw, and used through its
object-oriented API: a :class:`~matplotlib.figure.Figure` on an Agg canvas, no pyplot, so there
is no global figure state to leak between runs and nothing to close. Every plot numbers the
experiences 1..T, as the run log does ("experience 3/5"); the CSV and JSON files keep the
0-based indexes. :func:`heatmap` and :func:`draw_matrix` are public: the TensorBoard logger and
``clrun-report`` draw the same heatmap.
"""

from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from clrun.io import write_atomic

FORMATS = ("png", "pdf", "svg")  # what plots.format may list
DPI = 110  # pixels per inch of the PNGs
UNTRAINED = "#d9d9d9"  # cells of experiences not yet trained on (and missing values)
UNTRAINED_TEXT = "#7f7f7f"  # their numbers: readable, but visibly not the learned ones
# File metadata that would make two identical plots differ (a date, random SVG ids): left out.
_NO_DATE = {"pdf": {"CreationDate": None}, "svg": {"Date": None}, "png": {}}


def check_formats(formats: Iterable[str]) -> list[str]:
    """``formats`` as a list; a ValueError naming the first that is not png | pdf | svg."""
    formats = list(formats)
    for f in formats:
        if f not in FORMATS:
            raise ValueError(f"plots.format: {f!r} is not one of {' | '.join(FORMATS)}")
    return formats


def plot_run(
    run_dir: Path, R: np.ndarray, title: str, formats: Sequence[str] = ("png",)
) -> list[Path]:
    """``acc_matrix.<fmt>`` and ``acc_curve.<fmt>`` in ``run_dir`` for each of ``formats``, for
    the accuracy matrix ``R`` (one row per trained-through experience, one column per test
    experience); return the files written. ``formats=[]``: nothing, matplotlib not imported."""
    formats = check_formats(formats)
    if not formats:
        return []
    R = np.asarray(R, dtype=float)
    with _gc_paused():
        figures = {"acc_matrix": heatmap(R, title), "acc_curve": curves(R, title)}
        return [p for stem, fig in figures.items() for p in save(fig, run_dir, stem, formats)]


def save(fig, folder: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    """``fig`` as ``<folder>/<stem>.<fmt>`` for each format, each written atomically, at the
    figure's own size (no tight bounding box: the pixels of a cell are where the figure put
    them). SVG and PDF files carry no date and fixed ids, so a repeated run writes the same
    bytes."""
    import matplotlib

    written = []
    for fmt in check_formats(formats):
        buf = io.BytesIO()
        with matplotlib.rc_context({"svg.hashsalt": "clrun"}):
            fig.savefig(buf, format=fmt, dpi=DPI, metadata=_NO_DATE[fmt])
        path = Path(folder) / f"{stem}.{fmt}"
        write_atomic(path, buf.getvalue())
        written.append(path)
    return written


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the garbage collector: importing matplotlib can set off a full collection over
    every object of the run, ~0.15 s in a process that holds torch; what the plots leave behind
    is collected later as usual."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def figure(figsize: tuple[float, float]):
    """A matplotlib Figure on its own Agg canvas (no pyplot: nothing global, nothing to
    close), laid out by constrained layout, which also makes room for legends outside the
    axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def legend_right(ax, fontsize: float = 7) -> None:
    """The legend to the right of the axes, outside them, so that it never covers data."""
    n = len(ax.get_legend_handles_labels()[1])
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.02, 1),
        borderaxespad=0,
        fontsize=fontsize,
        ncol=1 if n <= 14 else 2,
        frameon=False,
    )


def _ticks(n: int, most: int) -> list[int]:
    """Experience numbers to label among 1..n, at most ``most`` + 1 of them: every one, or 1
    and the multiples of 2, 5, 10, 20, ... (1, 5, 10, 15, ... reads better than 1, 6, 11)."""
    step = next(b * 10**e for e in range(12) for b in (1, 2, 5) if n // (b * 10**e) <= most)
    return sorted({1, *range(step, n + 1, step)})


# ------------------------------------------------------------------ the accuracy matrix


def draw_matrix(ax, R: np.ndarray, fontsize: float = 7):
    """The heatmap of R[i][j] on ``ax``, rows and columns labelled with experiences 1..T.

    Cells with j > i (the upper triangle: experience j not yet trained on when the model had
    been trained through i) are drawn light grey, not in the colour scale: their accuracy is
    forward transfer, not something learned, and in the class-incremental scenario it is ~0,
    which would otherwise read as forgetting. Their numbers are still written, in grey, because
    FWT is computed from them. A missing value (NaN) is grey too, without a number. Numbers are
    written while the stream has ≤ 20 experiences. Returns the image (for a colour bar)."""
    from matplotlib import colormaps

    n_rows, T = R.shape
    untrained = np.arange(T)[None, :] > np.arange(n_rows)[:, None]
    cmap = colormaps["viridis"].with_extremes(bad=UNTRAINED)
    image = ax.imshow(np.ma.masked_where(untrained | np.isnan(R), R), vmin=0, vmax=1, cmap=cmap)
    for i in range(n_rows if T <= 20 else 0):
        for j in range(T):
            if np.isnan(R[i, j]):
                continue
            color = UNTRAINED_TEXT if untrained[i, j] else "white" if R[i, j] < 0.6 else "black"
            ax.text(
                j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=fontsize, color=color
            )
    ax.set_xticks([k - 1 for k in _ticks(T, 20)], [str(k) for k in _ticks(T, 20)])
    ax.set_yticks([k - 1 for k in _ticks(n_rows, 20)], [str(k) for k in _ticks(n_rows, 20)])
    ax.set_xlabel("evaluated on experience")
    ax.set_ylabel("trained through experience")
    return image


def heatmap(R: np.ndarray, title: str):
    """The accuracy matrix R[i][j] as a figure with a colour bar (see :func:`draw_matrix`)."""
    R = np.asarray(R, dtype=float)
    n_rows, T = R.shape
    cell = min(0.6, 8 / T)  # long streams: smaller cells, no numbers
    fig = figure((max(3.6, 2.2 + cell * T), max(2.6, 1.4 + cell * n_rows)))
    ax = fig.subplots()
    image = draw_matrix(ax, R)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy")
    return fig


# ------------------------------------------------------------------ accuracy over time


def curves(R: np.ndarray, title: str):
    """Accuracy on each test experience j from the time it was trained on, and the average
    over the experiences seen so far (dashed); the legend, right of the axes, names up to 20
    experiences."""
    R = np.asarray(R, dtype=float)
    n_rows, T = R.shape
    fig = figure((7, 4))
    ax = fig.subplots()
    steps = np.arange(1, n_rows + 1)  # trained through experience 1..n_rows
    colors = "tab10" if T <= 10 else "tab20"
    from matplotlib import colormaps

    cmap = colormaps[colors]
    for j in range(min(T, n_rows)):
        ax.plot(
            steps[j:],
            R[j:, j],
            marker="o",
            ms=4,
            lw=1.5,
            color=cmap(j % cmap.N),
            label=f"experience {j + 1}" if T <= 20 else None,
        )
    seen = [np.nanmean(R[i, : i + 1]) for i in range(n_rows)]
    ax.plot(steps, seen, "k--", lw=2, label="average on seen")
    ax.set_xlabel("trained through experience")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0.5, n_rows + 0.5)
    ax.set_xticks(_ticks(n_rows, 20))
    ax.set_title(title, fontsize=9)
    legend_right(ax)
    return fig


# ------------------------------------------------------------------ unlearning


def plot_unlearning(
    run_dir: Path, recorder, block: dict, title: str, formats: Sequence[str] = ("png",)
) -> list[Path]:
    """``unlearning.<fmt>``: accuracy per test experience over the run's timeline with the
    unlearning requests marked (forgotten experiences drawn thick and dashed) and, with a
    reference run, each experience's final accuracy beside the reference model's. Experiences
    are numbered 1..T. ``formats=[]``: nothing."""
    formats = check_formats(formats)
    if not formats:
        return []
    with _gc_paused():
        return save(_unlearning_figure(recorder, block, title), run_dir, "unlearning", formats)


def _unlearning_figure(recorder, block: dict, title: str):
    reference = block.get("reference")
    fig = figure((12 if reference else 7.5, 4))
    axes = fig.subplots(1, 2 if reference else 1, squeeze=False)
    ax = axes[0][0]
    labels, points, trained_at = [], [], {}  # one point per evaluation
    for i, row in enumerate(recorder.rows):
        trained_at[i] = len(points)
        labels.append(str(i + 1))
        points.append([r["acc"] for r in row])
        for u in recorder.unlearned:
            if u["after_experience"] == i:
                ax.axvline(len(points) - 0.5, color="red", ls=":", lw=1)
                labels.append(f"forget\n{','.join(str(j + 1) for j in u['forgotten'])}")
                points.append([r["acc"] for r in u["results"]])
    acc, forgotten = np.array(points), set(block.get("forgotten", []))
    for j in range(acc.shape[1]):
        if j not in trained_at:
            continue
        start = trained_at[j]
        x = np.arange(start, len(points))
        ax.plot(
            x,
            acc[start:, j],
            marker="o",
            ms=3,
            lw=2.5 if j in forgotten else 1,
            ls="--" if j in forgotten else "-",
            label=f"experience {j + 1}" + (" (forgotten)" if j in forgotten else ""),
        )
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("trained through experience / unlearning request")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    legend_right(ax)
    if reference and "acc_diff" in reference:
        ax = axes[0][1]
        ours = np.array(reference["reference_acc"]) + np.array(reference["acc_diff"])
        j = np.arange(len(ours))
        ax.bar(j + 1 - 0.2, ours, 0.4, label="after unlearning (ours)")
        ax.bar(
            j + 1 + 0.2, reference["reference_acc"], 0.4, label="reference: never\ntrained on it"
        )
        ax.set_xticks(j + 1, [f"{k + 1}{'*' if k in forgotten else ''}" for k in j])
        ax.set_xlabel("test experience (* forgotten)")
        ax.set_ylabel("final test accuracy")
        ax.set_ylim(0, 1.02)
        js = ", ".join(
            f"exp {int(k) + 1}: JS {d['js_divergence']:.3f}, agree {d['agreement']:.2f}"
            for k, d in reference["forgotten"].items()
        )
        ax.set_title(f"final model vs reference ({js})", fontsize=8)
        legend_right(ax)
    return fig


# ------------------------------------------------------------------ reports (clrun-report)


def group_bars(stats: dict[str, tuple[float, float, int]], xlabel: str, unit: bool = True):
    """One horizontal bar per group of runs: the mean of a metric, error bar = its std, the
    label naming n. ``unit``: the metric lies in [0, 1] (an accuracy), the axis shows all of
    it."""
    fig = figure((7, 1.0 + 0.4 * len(stats)))
    ax = fig.subplots()
    means = [0.0 if np.isnan(m) else m for m, _, _ in stats.values()]
    xerr = [0.0 if np.isnan(s) else s for _, s, _ in stats.values()]
    ax.barh(range(len(stats)), means, xerr=xerr, capsize=4)
    labels = [f"{g} (n={n})" for g, (_, _, n) in stats.items()]
    ax.set_yticks(range(len(stats)), labels, fontsize=8)
    ax.invert_yaxis()
    if unit:
        ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    return fig


def group_curves(curves: dict[str, np.ndarray], ylabel: str):
    """One line per group: ``curves[label]`` holds one row per run of the average accuracy on
    the experiences seen so far after each experience 1..T; the line is their mean, the band
    ± their std (two runs or more). The legend right of the axes."""
    fig = figure((9, 4.5))
    ax = fig.subplots()
    for name, c in curves.items():
        x, mean = np.arange(1, c.shape[1] + 1), c.mean(0)
        (line,) = ax.plot(x, mean, marker="o", label=f"{name} (n={len(c)})")
        if len(c) > 1:
            std = c.std(0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
        ax.set_xticks(x)
    ax.set_xlabel("trained through experience")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    if ax.get_legend_handles_labels()[1]:
        legend_right(ax)
    return fig


def group_matrices(matrices: dict[str, np.ndarray]):
    """One heatmap per group (its runs' mean R[i][j]), drawn as a run's heatmap is, four to a
    row."""
    cols = max(1, min(4, len(matrices)))
    rows = max(1, -(-len(matrices) // cols))
    fig = figure((3.6 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(matrices) :]:
        ax.axis("off")
    for ax, (name, R) in zip(axes.flat, matrices.items(), strict=False):
        draw_matrix(ax, R, fontsize=6)
        ax.set_title(name, fontsize=8)
        ax.xaxis.label.set_fontsize(7)
        ax.yaxis.label.set_fontsize(7)
    return fig


def _natural(label: str) -> list:
    """Sort key that orders numbers in labels by value: ``size=200`` before ``size=1000``."""
    import re

    parts = re.split(r"(\d+(?:\.\d+)?(?:e-?\d+)?)", label)
    return [(0, float(t), "") if i % 2 else (1, 0.0, t) for i, t in enumerate(parts)]


def sweep_curves(points: dict[str, dict[float, list[float]]], xlabel: str, ylabel: str):
    """A metric against a numeric hyperparameter: one curve per group, ``points[label][x]`` the
    runs' values at x; the line through their means, the band ± their std where there are two
    or more. The x axis is logarithmic when the values are positive and span more than a
    factor 100 (learning rates, regularisation strengths)."""
    fig = figure((8, 4.5))
    ax = fig.subplots()
    xs = [x for p in points.values() for x in p]
    for name, p in sorted(points.items(), key=lambda item: _natural(item[0])):
        x = np.array(sorted(p))
        values = [np.array(p[v], dtype=float) for v in x]
        mean = np.array([v.mean() for v in values])
        std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
        n = sorted({len(v) for v in values})
        seeds = f"n={n[0]}" if len(n) == 1 else f"n={n[0]}-{n[-1]}"
        (line,) = ax.plot(x, mean, marker="o", label=f"{name} ({seeds})")
        if any(len(v) > 1 for v in values):
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
    if xs and min(xs) > 0 and max(xs) / min(xs) > 100:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{ylabel} (mean ± std)")
    if ax.get_legend_handles_labels()[1]:
        legend_right(ax)
    return fig
