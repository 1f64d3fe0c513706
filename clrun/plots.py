"""Plots of a run: the accuracy matrix as a heatmap and accuracy per experience over time.

:func:`plot_run` draws the run directory's ``acc_matrix.png`` and ``acc_curve.png`` with Pillow
(a dependency of matplotlib): with matplotlib they cost every run ~0.45 s (importing it 0.2 s,
drawing 0.2 s, its objects at exit), ~10% of a 5-second Split MNIST run; with Pillow ~0.05 s.
Text is set in Pillow's built-in scalable font; everything is drawn at twice the size and scaled
down, so edges are smooth. Should Pillow fail (a build without FreeType), the same plots are
drawn with matplotlib. :func:`heatmap` is the heatmap as a matplotlib figure, for loggers that
take figures (TensorBoard); clrun-report draws its plots with matplotlib.
"""

from __future__ import annotations

import functools
import gc
import io
import logging
from pathlib import Path

import numpy as np

from clrun.io import write_atomic

log = logging.getLogger(__name__)

DPI = 110  # pixels per inch of the PNGs
SS = 2  # drawn at SS× the size, then scaled down (anti-aliasing)
# viridis at 0, 1/16, ..., 1 (matplotlib's colormap), linear in between (off by ≤ 4/255)
VIRIDIS = np.array([[int(h[k : k + 2], 16) for k in (0, 2, 4)] for h in (
    "440154", "48186a", "472d7b", "424086", "3b528b", "33638d", "2c728e", "26828e", "21918c",
    "1fa088", "28ae80", "3fbc73", "5ec962", "84d44b", "addc30", "d8e219", "fde725")])  # fmt: skip
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
         "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip


def plot_run(run_dir: Path, R: np.ndarray, title: str) -> None:
    """``acc_matrix.png`` and ``acc_curve.png`` in ``run_dir`` for the accuracy matrix ``R``
    (one row per trained-through experience, one column per test experience).

    The garbage collector is paused meanwhile: the imports drawing needs (Pillow's, or
    matplotlib's) can set off a full collection over every object of the run, ~0.15 s in a
    process that holds torch; what the plots leave behind is collected later as usual."""
    R = np.asarray(R, dtype=float)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        try:
            images = {"acc_matrix.png": _matrix_image(R, title),
                      "acc_curve.png": _curve_image(R, title)}  # fmt: skip
            files = {name: _png(image) for name, image in images.items()}
        except Exception as e:  # noqa: BLE001 - a Pillow without FreeType, say: use matplotlib
            log.warning("drawing the plots with Pillow failed (%s: %s); using matplotlib",
                        type(e).__name__, e)  # fmt: skip
            files = _matplotlib_pngs(R, title)
    finally:
        if was_enabled:
            gc.enable()
    for name, data in files.items():
        write_atomic(Path(run_dir) / name, data)


def viridis(v: float) -> tuple[int, int, int]:
    """The viridis colour of ``v`` in [0, 1] (clipped; NaN is grey)."""
    if not np.isfinite(v):
        return (128, 128, 128)
    x = min(max(float(v), 0.0), 1.0) * (len(VIRIDIS) - 1)
    k = min(int(x), len(VIRIDIS) - 2)
    c = VIRIDIS[k] + (x - k) * (VIRIDIS[k + 1] - VIRIDIS[k])
    return tuple(int(round(a)) for a in c)


# ------------------------------------------------------------------ drawing helpers (Pillow)


class _Canvas:
    """A white image of w × h points (72 per inch; DPI/72 output pixels each) that is drawn
    at SS× that resolution and scaled down by :meth:`result`. Coordinates, sizes and line
    widths are in points, as in matplotlib."""

    def __init__(self, w: float, h: float):
        from PIL import Image, ImageDraw

        self.k = DPI / 72 * SS  # drawing pixels per point
        self.size = (round(w * DPI / 72), round(h * DPI / 72))
        self.image = Image.new("RGB", (self.size[0] * SS, self.size[1] * SS), "white")
        self.draw = ImageDraw.Draw(self.image)

    def _xy(self, points) -> list[tuple[float, float]]:
        return [(x * self.k, y * self.k) for x, y in points]

    def text(self, xy, s: str, size: float = 10, anchor: str = "mm", fill="black") -> None:
        (x, y) = self._xy([xy])[0]
        self.draw.text((x, y), s, font=_font(size * self.k), anchor=anchor, fill=fill)

    def vtext(self, xy, s: str, size: float = 10) -> None:
        """Text rotated 90° counter-clockwise, centred on ``xy``."""
        from PIL import Image, ImageDraw

        font = _font(size * self.k)
        left, top, right, bottom = font.getbbox(s)
        label = Image.new("L", (right - left + 4, bottom - top + 4), 0)
        ImageDraw.Draw(label).text((2 - left, 2 - top), s, font=font, fill=255)
        label = label.rotate(90, expand=True)
        (x, y) = self._xy([xy])[0]
        self.image.paste(
            (0, 0, 0), (round(x - label.width / 2), round(y - label.height / 2)), label
        )

    def rect(self, box, fill=None, outline=None, width: float = 0.8) -> None:
        (x0, y0), (x1, y1) = self._xy([box[:2], box[2:]])
        w = max(1, round(width * self.k)) if outline else 0
        self.draw.rectangle((x0, y0, x1, y1), fill=fill, outline=outline, width=w)

    def line(self, points, fill="black", width: float = 1.0, dash: tuple | None = None) -> None:
        """A polyline ``width`` points wide; ``dash`` = (on, off) in line widths."""
        pts, w = self._xy(points), max(1, round(width * self.k))
        if dash is None:
            self.draw.line(pts, fill=fill, width=w, joint="curve")
            return
        on, off = (d * width * self.k for d in dash)
        phase = 0.0  # distance into the current dash period, carried over the vertices
        for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
            length = float(np.hypot(x1 - x0, y1 - y0))
            s = 0.0
            while s < length:
                step = min((on if phase < on else on + off) - phase, length - s)
                if phase < on:
                    a, b = s / length, (s + step) / length
                    ends = [(x0 + t * (x1 - x0), y0 + t * (y1 - y0)) for t in (a, b)]
                    self.draw.line(ends, fill=fill, width=w)
                s, phase = s + step, (phase + step) % (on + off)

    def dot(self, xy, radius: float, fill) -> None:
        (x, y), r = self._xy([xy])[0], radius * self.k
        self.draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)

    def result(self):
        from PIL import Image

        return self.image.resize(self.size, Image.Resampling.LANCZOS)


@functools.lru_cache(maxsize=32)
def _font(pixels: float):
    """Pillow's built-in scalable font (Pillow ≥ 10.1) at ``pixels`` pixels."""
    from PIL import ImageFont

    return ImageFont.load_default(size=pixels)


def _width(s: str, size: float) -> float:
    """The width of ``s`` in points, set at ``size`` points."""
    return _font(size).getlength(s)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", dpi=(DPI, DPI))
    return buf.getvalue()


def _ticks(n: int, most: int) -> range:
    """Tick positions among 0..n-1: every 1, 2, 5, 10, 20, ... so that at most ``most``."""
    step = next(b * 10**e for e in range(12) for b in (1, 2, 5) if -(-n // (b * 10**e)) <= most)
    return range(0, n, step)


# ------------------------------------------------------------------ the two plots


def _matrix_image(R: np.ndarray, title: str):
    """Heatmap of R: one cell per (trained-through i, evaluated j), with its value when the
    stream has ≤ 20 experiences; a colour bar for 0..1."""
    n_rows, T = R.shape
    cell = min(0.6, 12 / T) * 72  # long streams: smaller cells, no numbers
    cell = max(cell, 160 / max(T, n_rows))  # short ones: room for the axis labels
    left = 22 + max(_width(str(i), 10) for i in _ticks(n_rows, 20)) + 6
    top, grid_w, grid_h = 24, cell * T, cell * n_rows
    bar = left + grid_w + 14  # the colour bar's left edge
    right = bar + 10 + 5 + _width("1.0", 10) + 20
    width = max(right + 4, _width(title, 9) + 12)
    c = _Canvas(width, top + grid_h + 42)
    c.text((width / 2, top / 2), title, size=9)
    for i in range(n_rows):
        for j in range(T):
            x, y = left + j * cell, top + i * cell
            c.rect((x, y, x + cell, y + cell), fill=viridis(R[i, j]))
            if T <= 20:
                color = "white" if R[i, j] < 0.6 else "black"
                c.text((x + cell / 2, y + cell / 2), f"{R[i, j]:.2f}", 7, fill=color)
    c.rect((left, top, left + grid_w, top + grid_h), outline="black")
    for j in _ticks(T, 20):
        x = left + (j + 0.5) * cell
        c.line([(x, top + grid_h), (x, top + grid_h + 3.5)], width=0.8)
        c.text((x, top + grid_h + 5), str(j), 10, anchor="mt")
    for i in _ticks(n_rows, 20):
        y = top + (i + 0.5) * cell
        c.line([(left - 3.5, y), (left, y)], width=0.8)
        c.text((left - 5, y), str(i), 10, anchor="rm")
    c.text((left + grid_w / 2, top + grid_h + 22), "evaluated on experience j", 10, "mt")
    c.vtext((9, top + grid_h / 2), "trained through experience i", 10)
    steps = 64  # the colour bar: 0 at the bottom, 1 at the top
    for k in range(steps):
        y0, y1 = top + grid_h * (1 - (k + 1) / steps), top + grid_h * (1 - k / steps)
        c.rect((bar, y0, bar + 10, y1), fill=viridis((k + 0.5) / steps))
    c.rect((bar, top, bar + 10, top + grid_h), outline="black")
    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = top + grid_h * (1 - v)
        c.line([(bar + 10, y), (bar + 13.5, y)], width=0.8)
        c.text((bar + 15, y), f"{v:.1f}", 10, anchor="lm")
    c.vtext((right - 6, top + grid_h / 2), "accuracy", 10)
    return c.result()


def _curve_image(R: np.ndarray, title: str):
    """Accuracy on each test experience j from the time it was trained on, and the average
    over the experiences seen so far (dashed); the legend names up to 20 experiences."""
    n_rows, T = R.shape
    legend = [(f"exp {j}", TAB10[j % 10], None) for j in range(T if T <= 20 else 0)]
    legend.append(("avg seen", "black", (3.7, 1.6)))
    cols = 1 if len(legend) <= 12 else 2
    per_col = -(-len(legend) // cols)
    col_w = max(_width(name, 7) for name, _, _ in legend) + 28
    w, h = 432, 288  # 6 × 4 inches
    left, right, top, bottom = 46, w - 10 - cols * col_w, 22, h - 36
    lo, hi = (-0.5, 0.5) if n_rows == 1 else (-0.05 * (n_rows - 1), 1.05 * (n_rows - 1))

    def at(step: float, acc: float) -> tuple[float, float]:
        x = left + (step - lo) / (hi - lo) * (right - left)
        return x, bottom - min(max(acc, 0.0), 1.02) / 1.02 * (bottom - top)

    c = _Canvas(w, h)
    c.text(((left + right) / 2, top / 2), title, size=9)
    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        y = at(lo, v)[1]
        c.line([(left - 3.5, y), (left, y)], width=0.8)
        c.text((left - 5, y), f"{v:.1f}", 10, anchor="rm")
    for s in _ticks(n_rows, 10):
        x = at(s, 0)[0]
        c.line([(x, bottom), (x, bottom + 3.5)], width=0.8)
        c.text((x, bottom + 5), str(s), 10, anchor="mt")
    c.text(((left + right) / 2, bottom + 22), "trained through experience", 10, "mt")
    c.vtext((9, (top + bottom) / 2), "test accuracy", 10)
    for j in range(T):
        points, color = [at(i, R[i, j]) for i in range(j, n_rows)], TAB10[j % 10]
        if len(points) > 1:
            c.line(points, fill=color, width=1.5)
        for p in points:
            c.dot(p, 3, color)
    avg = [at(i, float(np.mean(R[i, : i + 1]))) for i in range(n_rows)]
    if len(avg) > 1:
        c.line(avg, fill="black", width=2, dash=(3.7, 1.6))
    c.rect((left, top, right, bottom), outline="black")
    for k, (name, color, dash) in enumerate(legend):
        x, y = right + 10 + (k // per_col) * col_w, top + 6 + (k % per_col) * 12
        c.line([(x, y), (x + 16, y)], fill=color, width=2 if dash else 1.5, dash=dash)
        if dash is None:
            c.dot((x + 8, y), 3, color)
        c.text((x + 20, y), name, 7, anchor="lm")
    return c.result()


# ------------------------------------------------------------------ matplotlib


def heatmap(R: np.ndarray, title: str):
    """The accuracy matrix R[i][j] as a matplotlib figure (object-oriented API: no pyplot, no
    figure to close)."""
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


def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _matplotlib_pngs(R: np.ndarray, title: str) -> dict[str, bytes]:
    """The two plots drawn with matplotlib."""
    fig = _figure((6, 4))
    ax = fig.subplots()
    n_rows, T = R.shape
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
    out = {}
    for name, f in (("acc_matrix.png", heatmap(R, title)), ("acc_curve.png", fig)):
        buf = io.BytesIO()
        f.savefig(buf, format="png", dpi=DPI)
        out[name] = buf.getvalue()
    return out


def plot_unlearning(run_dir: Path, recorder, block: dict, title: str) -> None:
    """``unlearning.png``: accuracy per test experience over the run's timeline with the
    unlearning requests marked (forgotten experiences drawn thick) and, with a reference run,
    each experience's final accuracy beside the reference model's."""
    reference = block.get("reference")
    fig = _figure((11 if reference else 6.5, 4))
    axes = fig.subplots(1, 2 if reference else 1, squeeze=False)
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    write_atomic(Path(run_dir) / "unlearning.png", buf.getvalue())
