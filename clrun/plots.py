"""Plots of a run: the accuracy matrix as a heatmap and accuracy per experience over time."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from clrun.io import write_atomic


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(R: np.ndarray, title: str):
    """The accuracy matrix R[i][j] as a matplotlib figure."""
    plt = _pyplot()
    n_rows, T = R.shape
    cell = min(0.6, 12 / T)  # long streams: smaller cells, no numbers
    fig, ax = plt.subplots(figsize=(2.2 + cell * T, 1.4 + cell * n_rows), layout="constrained")
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
    plt = _pyplot()
    fig = heatmap(R, title)
    _save(fig, run_dir / "acc_matrix.png")
    plt.close(fig)
    n_rows, T = R.shape

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
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
    plt.close(fig)
