"""The run's plots: two PNGs drawn with Pillow (matplotlib stays out of the run), and the
matplotlib fallback."""

import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clrun import plots


@pytest.mark.parametrize("T", [1, 2, 5, 50])
def test_plot_run_writes_both_pngs(tmp_path, T):
    R = np.tril(np.random.default_rng(T).random((T, T)))
    R[0, 0] = np.nan  # a missing value is drawn grey, not an error
    plots.plot_run(tmp_path, R, "naive on split_mnist (mlp), seed 0")
    for name in ("acc_matrix.png", "acc_curve.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert 200 <= im.width <= 2000 and 150 <= im.height <= 2000
            assert len(im.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # drawn on
    assert {p.name for p in tmp_path.iterdir()} == {"acc_matrix.png", "acc_curve.png"}


def test_plot_run_does_not_import_matplotlib(tmp_path):
    code = (
        "import sys, numpy as np; from clrun import plots; "
        f"plots.plot_run({str(tmp_path)!r}, np.eye(3), 't'); "
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_viridis_matches_matplotlib():
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    for v in np.linspace(0, 1, 101):
        want = np.round(np.array(cmap(v)[:3]) * 255)
        assert np.abs(np.array(plots.viridis(v)) - want).max() <= 4, v  # of 255: invisible
    assert plots.viridis(-1) == plots.viridis(0) and plots.viridis(2) == plots.viridis(1)


def test_matplotlib_fallback(tmp_path, monkeypatch, caplog):
    def broken(*args):
        raise OSError("no FreeType")

    monkeypatch.setattr(plots, "_matrix_image", broken)
    with caplog.at_level(logging.WARNING, logger=plots.__name__):
        plots.plot_run(tmp_path, np.eye(2), "t")
    assert "using matplotlib" in caplog.text
    for name in ("acc_matrix.png", "acc_curve.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG"
