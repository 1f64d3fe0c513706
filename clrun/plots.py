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


def plot_unlearning(run_dir: Path, recorder, block: dict, title: str) -> None:
    """``unlearning.png``: accuracy per test experience over the run's timeline with the
    unlearning requests marked (forgotten experiences drawn thick) and, with a reference run,
    each experience's final accuracy beside the reference model's."""
    plt = _pyplot()
    reference = block.get("reference")
    fig, axes = plt.subplots(1, 2 if reference else 1, figsize=(11 if reference else 6.5, 4),
                             layout="constrained", squeeze=False)  # fmt: skip
    ax = axes[0][0]
    labels, points = [], []  # one point per evaluation: after training i, after unlearning at i
    for i, row in enumerate(recorder.rows):
        labels.append(str(i))
        points.append([r["acc"] for r in row])
        for u in recorder.unlearned:
            if u["after_experience"] == i:
                ax.axvline(len(points) - 0.5, color="red", ls=":", lw=1)
                labels.append(f"forget\n{','.join(map(str, u['forgotten']))}")
                points.append([r["acc"] for r in u["results"]])
    acc, forgotten = np.array(points), set(block.get("forgotten", []))
    first = {j: labels.index(str(j)) for j in range(acc.shape[1]) if str(j) in labels}
    for j, start in first.items():
        x = np.arange(start, len(points))
        ax.plot(x, acc[start:, j], marker="o", ms=3, lw=2.5 if j in forgotten else 1,
                ls="--" if j in forgotten else "-",
                label=f"exp {j}" + (" (forgotten)" if j in forgotten else ""))  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("trained through experience / unlearning request")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    if reference and "acc_diff" in reference:
        ax = axes[0][1]
        ours = np.array(reference["reference_acc"]) + np.array(reference["acc_diff"])
        j = np.arange(len(ours))
        ax.bar(j - 0.2, ours, 0.4, label="after unlearning (ours)")
        ax.bar(j + 0.2, reference["reference_acc"], 0.4, label="reference: never trained on it")
        ax.set_xticks(j, [f"{k}{'*' if k in forgotten else ''}" for k in j])
        ax.set_xlabel("test experience (* forgotten)")
        ax.set_ylabel("final test accuracy")
        ax.set_ylim(0, 1.02)
        js = ", ".join(f"exp {k}: JS {d['js_divergence']:.3f}, agree {d['agreement']:.2f}"
                       for k, d in reference["forgotten"].items())  # fmt: skip
        ax.set_title(f"final model vs reference ({js})", fontsize=8)
        ax.legend(fontsize=7)
    _save(fig, run_dir / "unlearning.png")
    plt.close(fig)
