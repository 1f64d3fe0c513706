"""Plots of a run: the accuracy matrix as a heatmap and accuracy per experience over time.

Drawn with matplotlib's object-oriented API (``Figure`` + the Agg canvas), never through
``pyplot``: importing pyplot costs ~0.3 s per run, and figures that pyplot does not track need
no closing and leak nothing."""

from __future__ import annotations

import gc
import io
from pathlib import Path

import numpy as np

from clrun.io import write_atomic


def _figure(figsize: tuple[float, float]):
    """A figure on its own Agg canvas, with constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())


def heatmap(R: np.ndarray, title: str):
    """The accuracy matrix R[i][j] as a matplotlib figure."""
    n_rows, T = R.shape
    cell = min(0.6, 12 / T)  # long streams: smaller cells, no numbers
    fig = _figure((2.2 + cell * T, 1.4 + cell * n_rows))
    ax = fig.subplots()
    im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    for i in range(n_rows if T <= 20 else 0):
        for j in range(T):
            color = "white" if R[i, j] < 0.6 else "black"
            ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("evaluated on experience j")
    ax.set_ylabel("trained through experience i")
    ax.set_xticks(range(0, T, max(1, T // 20)))
    ax.set_yticks(range(0, n_rows, max(1, T // 20)))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy")
    return fig


def plot_run(run_dir: Path, R: np.ndarray, title: str) -> None:
    """``acc_matrix.png`` and ``acc_curve.png`` in ``run_dir``.

    Importing matplotlib allocates enough objects to set off a full garbage collection, which in
    a process that holds torch scans every object of the run (~400k: 0.15-0.25 s, more than the
    drawing). The collector is paused while the plots are drawn; whatever they leave behind is
    collected with everything else later."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        _plot_run(run_dir, R, title)
    finally:
        if was_enabled:
            gc.enable()


def _plot_run(run_dir: Path, R: np.ndarray, title: str) -> None:
    _save(heatmap(R, title), run_dir / "acc_matrix.png")
    n_rows, T = R.shape

    fig = _figure((6, 4))
    ax = fig.subplots()
    steps = np.arange(n_rows)
    for j in range(T):
        ax.plot(steps[j:], R[j:, j], marker="o", label=f"exp {j}")
    ax.plot(steps, [R[i, : i + 1].mean() for i in range(n_rows)], "k--", lw=2, label="avg seen")
    ax.set_xlabel("trained through experience")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(steps)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, run_dir / "acc_curve.png")
