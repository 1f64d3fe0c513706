"""The run's plots (matplotlib): one file per plot and ``plots.format`` entry, none for ``[]``
(matplotlib then not imported), untrained cells grey, experiences numbered 1..T."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clrun import plots
from clrun.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "pdf": (b"%PDF",), "svg": (b"<?xml", b"<svg")}
TITLE = "naive on split_mnist (mlp), seed 0"


def lower_triangular(T: int, seed: int = 0) -> np.ndarray:
    """A matrix as a class-incremental run gives: learned cells in [0.3, 1], the rest ~0."""
    R = np.random.default_rng(seed).uniform(0.3, 1.0, (T, T))
    return np.where(np.tri(T, dtype=bool), R, 0.01)


def cell_rgb(image: np.ndarray, fig, ax, i: int, j: int) -> np.ndarray:
    """The RGB (0..1) of image at a point inside cell (i, j) of ``ax``'s heatmap, clear of the
    number written at the cell's centre."""
    x, y = ax.transData.transform((j - 0.3, i - 0.3))
    return image[int(round(fig.bbox.height - y)), int(round(x)), :3]


@pytest.mark.parametrize("fmt", plots.FORMATS)
def test_each_format_writes_a_real_file_of_its_type(tmp_path, fmt):
    written = plots.plot_run(tmp_path, lower_triangular(3), TITLE, [fmt])
    names = {f"acc_matrix.{fmt}", f"acc_curve.{fmt}"}
    assert {p.name for p in written} == names == {p.name for p in tmp_path.iterdir()}
    for p in written:
        head = p.read_bytes()[:64].lstrip()
        assert head.startswith(MAGIC[fmt]), (p.name, head)
        assert p.stat().st_size > 5_000, p.name  # drawn on, not an empty page


def test_several_formats_at_once_and_repeatable_bytes(tmp_path):
    R = lower_triangular(4)
    plots.plot_run(tmp_path / "a", R, TITLE, ["png", "pdf", "svg"])
    plots.plot_run(tmp_path / "b", R, TITLE, ["png", "pdf", "svg"])
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 6
    for name in names:  # no date, no random ids: a rerun writes the same bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_no_format_writes_nothing_and_does_not_import_matplotlib(tmp_path):
    code = (
        "import sys, numpy as np; from clrun import plots; "
        f"assert plots.plot_run({str(tmp_path)!r}, np.eye(3), 't', []) == []; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)  # this checkout's clrun
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_format_is_an_error():
    with pytest.raises(ValueError, match=r"plots.format: 'gif' is not one of png \| pdf \| svg"):
        plots.plot_run("unused", np.eye(2), "t", ["png", "gif"])


@pytest.mark.parametrize(
    "value", ["[gif]", "png", "[png,jpeg]", "null"], ids=["gif", "string", "jpeg", "null"]
)
def test_an_invalid_plots_format_is_a_one_line_config_error(run_debug, tmp_path, value):
    with pytest.raises(ConfigError) as e:
        run_debug(f"plots.format={value}", run_dir=tmp_path / "run")
    message = str(e.value)
    assert message.startswith("plots.format=") and "png | pdf | svg" in message
    assert "\n" not in message
    assert not (tmp_path / "run" / "checkpoint").exists(), "training started"


@pytest.mark.parametrize("T", [1, 2, 5, 25])
def test_the_heatmap_greys_cells_not_yet_trained_on(tmp_path, T):
    from matplotlib.image import imread

    R = lower_triangular(T)
    plots.plot_run(tmp_path, R, TITLE, ["png"])
    image = imread(tmp_path / "acc_matrix.png")
    fig = plots.heatmap(R, TITLE)  # the same figure: where its cells are in the PNG
    fig.canvas.draw()
    ax = fig.axes[0]
    assert image.shape[:2] == (round(fig.bbox.height), round(fig.bbox.width))
    grey = np.array([int(plots.UNTRAINED[k : k + 2], 16) / 255 for k in (1, 3, 5)])
    for i in range(T):
        for j in range(T):
            rgb = cell_rgb(image, fig, ax, i, j)
            if j > i:  # upper triangle: not yet trained, grey whatever its value
                assert np.abs(rgb - grey).max() < 0.02, (i, j, rgb)
            else:  # learned: viridis, which is never grey
                assert np.ptp(rgb) > 0.2, (i, j, rgb)


def test_missing_values_are_grey_without_a_number():
    R = lower_triangular(3)
    R[1, 0] = np.nan
    fig = plots.heatmap(R, "t")
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert "nan" not in texts and len(fig.axes[0].texts) == 8


def test_untrained_numbers_are_written_lightly():
    R = lower_triangular(3)
    ax = plots.heatmap(R, "t").axes[0]
    by_cell = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert by_cell[(0, 2)].get_text() == "0.01"
    assert by_cell[(0, 2)].get_color() == plots.UNTRAINED_TEXT
    assert by_cell[(2, 0)].get_color() in ("white", "black")


def test_experiences_are_numbered_from_one():
    T = 4
    R = lower_triangular(T)
    ax = plots.heatmap(R, "t").axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["1", "2", "3", "4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    assert list(ax.get_xticks()) == [0, 1, 2, 3]  # column 0 is experience 1
    ax = plots.curves(R, "t").axes[0]
    assert list(ax.get_xticks()) == [1, 2, 3, 4]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"experience {k}" for k in range(1, T + 1)] + ["average on seen"]
    line = ax.get_lines()[1]  # experience 2 is first trained in step 2
    assert list(line.get_xdata()) == [2, 3, 4]
    assert ax.get_lines()[-1].get_xdata()[0] == 1


def test_long_streams_label_every_fifth_experience():
    ax = plots.heatmap(lower_triangular(50), "t").axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["1", "5", "10"]
    assert list(ax.get_xticks())[:3] == [0, 4, 9]
    assert len(ax.texts) == 0  # no numbers in 2,500 cells


def test_the_curves_legend_is_outside_the_axes():
    for T in (3, 12):
        fig = plots.curves(lower_triangular(T), "t")
        fig.canvas.draw()
        ax = fig.axes[0]
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1, "the legend overlaps the axes"
        assert legend.x1 <= fig.bbox.x1 + 1, "the legend is cut off"


def test_a_run_honours_plots_format(run_debug):
    _, run_dir = run_debug("plots.format=[pdf,svg]")
    made = {p.name for p in run_dir.iterdir() if p.suffix in (".png", ".pdf", ".svg")}
    assert made == {"acc_matrix.pdf", "acc_matrix.svg", "acc_curve.pdf", "acc_curve.svg"}
    _, run_dir = run_debug("plots.format=[]")
    assert not [p for p in run_dir.iterdir() if p.suffix in (".png", ".pdf", ".svg")]
    assert (run_dir / "acc_matrix.csv").exists()


class _Recorder:
    """What plot_unlearning reads of a recorder: a row per experience and the requests."""

    def __init__(self, R: np.ndarray, after: int, forgotten: list[int]):
        self.rows = [[{"acc": a} for a in row] for row in R]
        results = [{"acc": 0.1 if j in forgotten else a} for j, a in enumerate(R[after])]
        self.unlearned = [{"after_experience": after, "forgotten": forgotten, "results": results}]


def test_unlearning_plot_formats_and_numbering(tmp_path):
    R = lower_triangular(4)
    reference = {
        "reference_acc": [0.9, 0.5, 0.9, 0.9],
        "acc_diff": [0, -0.3, 0, 0],
        "forgotten": {"1": {"js_divergence": 0.1, "agreement": 0.8}},
    }
    block = {"forgotten": [1], "reference": reference}
    recorder = _Recorder(R, after=2, forgotten=[1])
    assert plots.plot_unlearning(tmp_path, recorder, block, "t", []) == []
    written = plots.plot_unlearning(tmp_path, recorder, block, "t", ["png", "svg"])
    assert sorted(p.name for p in written) == ["unlearning.png", "unlearning.svg"]
    fig = plots._unlearning_figure(recorder, block, "t")
    timeline, bars = fig.axes
    labels = [t.get_text() for t in timeline.get_xticklabels()]
    assert labels == ["1", "2", "3", "forget\n2", "4"]
    legend = [t.get_text() for t in timeline.get_legend().get_texts()]
    assert legend[1] == "experience 2 (forgotten)"
    assert [t.get_text() for t in bars.get_xticklabels()] == ["1", "2*", "3", "4"]
    assert "exp 2: JS 0.100" in bars.get_title()
