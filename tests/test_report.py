"""clrun-report on a hand-written sweep directory: grouping, mean ± std, failed and missing runs."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clrun import plots, report

ROOT = Path(__file__).resolve().parents[1]
R0 = [[0.9, 0.1], [0.5, 0.8]]
R1 = [[1.0, 0.0], [0.7, 0.9]]


def make_run(d: Path, overrides: list[str], summary: dict | None, R=None, in_summary=True):
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if summary is not None:
        summary = {**summary, "overrides": overrides} if in_summary else summary
        (d / "summary.json").write_text(json.dumps(summary))
    if R is not None:
        rows = "\n".join(",".join(f"{a:.6f}" for a in row) for row in R)
        (d / "acc_matrix.csv").write_text("exp0,exp1\n" + rows + "\n")


def done(acc, forgetting, bwt, fwt, wall):
    return dict(
        status="completed",
        final_avg_acc=acc,
        forgetting=forgetting,
        bwt=bwt,
        fwt=fwt,
        wall_time_s=wall,
    )


@pytest.fixture
def sweep(tmp_path):
    s = tmp_path / "sweep"
    make_run(s / "0", ["strategy=naive", "seed=0"], done(0.65, 0.40, -0.40, 0.01, 10.0), R0)
    make_run(
        s / "1", ["strategy=naive", "seed=1", "threads=2"], done(0.80, 0.30, -0.30, 0.03, 12.0), R1
    )
    make_run(s / "2", ["seed=2", "strategy=naive"], done(0.71, 0.35, -0.35, None, 11.0), R0)
    # No overrides in the summary (an older run): they are read from .hydra/overrides.yaml.
    make_run(
        s / "10",
        ["strategy=replay", "seed=0"],
        done(0.90, 0.05, -0.05, 0.02, 20.0),
        R1,
        in_summary=False,
    )
    failed = {"status": "failed", "error": "FloatingPointError: the loss became nan\ntraceback..."}
    make_run(s / "11", ["strategy=replay", "seed=1"], failed)
    make_run(s / "12", ["strategy=replay", "seed=2"], None)  # missing: no summary yet
    return s


def test_runs_are_found_in_natural_order_with_their_status(sweep):
    runs = report.find_runs([sweep])
    assert [r.dir.name for r in runs] == ["0", "1", "2", "10", "11", "12"]
    assert [r.status for r in runs] == ["completed"] * 4 + ["failed", "missing"]
    assert runs[3].overrides == ["strategy=replay", "seed=0"]
    assert runs[4].error == "FloatingPointError: the loss became nan"


def test_groups_ignore_seed_and_run_management_keys(sweep):
    groups = report.group_runs(report.find_runs([sweep]))
    assert {k: [r.dir.name for r in v] for k, v in groups.items()} == {
        "strategy=naive": ["0", "1", "2"],
        "strategy=replay": ["10"],
    }
    run = report.Run(
        Path("x"), overrides=["+a.b=1", "hydra.job.chdir=true", "data_dir=/d", "resume=true"]
    )
    assert run.group == "+a.b=1"


def test_mean_and_sample_std_match_hand_computation(sweep):
    rows = {r["group"]: r for r in report.table_rows(report.group_runs(report.find_runs([sweep])))}
    mean, std, n = rows["strategy=naive"]["final_avg_acc"]
    assert n == 3 and mean == pytest.approx((0.65 + 0.80 + 0.71) / 3)
    assert std == pytest.approx(statistics.stdev([0.65, 0.80, 0.71]))  # ddof=1
    assert rows["strategy=naive"]["fwt"][2] == 2  # None is left out, not counted as 0
    assert rows["strategy=naive"]["fwt"][0] == pytest.approx(0.02)
    mean, std, n = rows["strategy=replay"]["final_avg_acc"]
    assert (mean, n) == (0.90, 1) and np.isnan(std)


def test_report_files_table_and_not_completed_section(sweep, tmp_path):
    out = tmp_path / "out"
    text = report.report([sweep], out)
    assert (out / "report.md").read_text() == text
    assert "| strategy=naive | 3 | 0.720 ± 0.075 | 0.350 ± 0.050 |" in text
    assert "| strategy=replay | 1 | 0.900 | 0.050 |" in text
    assert "6 runs" in text and "4 completed, 2 not completed" in text
    section = text.split("## Runs that did not complete")[1]
    assert "failed" in section and "FloatingPointError: the loss became nan" in section
    assert "missing" in section and "strategy=replay seed=2" in section
    assert "traceback" not in section
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["group"] for r in rows] == ["strategy=naive", "strategy=replay"]
    assert float(rows[0]["wall_time_s_mean"]) == pytest.approx(11.0)
    assert float(rows[0]["wall_time_s_std"]) == pytest.approx(1.0)
    for png in ("final_acc.png", "acc_curves.png", "acc_matrices.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in text


def test_command_line_writes_into_the_first_directory(sweep):
    p = subprocess.run(
        [sys.executable, "-m", "clrun.report", str(sweep)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert "| strategy=naive | 3 |" in p.stdout
    assert (sweep / "report.md").exists() and (sweep / "report.csv").exists()


def test_command_line_without_runs_is_a_clear_error(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "clrun.report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "no runs" in p.stderr and "Traceback" not in p.stderr


def test_the_report_loads_no_torch():
    """clrun-report reads run directories without importing torch (a quick command); the run
    management keys it ignores come from the same torch-free module the runner uses."""
    code = "import sys, clrun.report; assert 'torch' not in sys.modules, 'torch imported'"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr


def test_unlearning_runs_get_their_columns_and_their_reference_is_not_a_run(tmp_path):
    s = tmp_path / "sweep"
    for seed, (forgotten, js) in enumerate([(0.5, 0.1), (0.7, 0.3)]):
        block = {
            "events": [{"after_experience": 1}],
            "final_forgotten_acc": forgotten,
            "final_retained_acc": 0.9,
            "reference": {"mean_js_divergence": js},
        }
        make_run(
            s / str(seed),
            ["strategy=amnesiac_lwf", f"seed={seed}"],
            {**done(0.8, 0.1, -0.1, 0.0, 5.0), "unlearning": block},
            R0,
        )
        make_run(
            s / str(seed) / "reference",
            ["strategy=amnesiac_lwf", f"seed={seed}"],
            done(0.2, 0.1, -0.1, 0.0, 5.0),
            R0,
        )
    runs = report.find_runs([s])
    assert [r.dir.name for r in runs] == ["0", "1"]
    (row,) = report.table_rows(report.group_runs(runs))
    assert row["unlearning.final_forgotten_acc"][:2] == pytest.approx(
        (0.6, statistics.stdev([0.5, 0.7]))
    )
    assert row["unlearning.reference.mean_js_divergence"][0] == pytest.approx(0.2)
    text = report.report([s])
    assert "| forgotten acc | retained acc | JS to reference |" in text
    header = (s / "report.csv").read_text().splitlines()[0]
    assert "unlearning.final_retained_acc_mean" in header


MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF", "svg": b"<?xml"}
PLOTS = ("final_acc", "acc_curves", "acc_matrices")


@pytest.mark.parametrize("fmt", ["png", "pdf", "svg"])
def test_report_plots_in_each_format(sweep, tmp_path, fmt):
    out = tmp_path / "out"
    text = report.report([sweep], out, formats=[fmt])
    made = sorted(p.name for p in out.iterdir() if p.suffix[1:] in MAGIC)
    assert made == sorted(f"{stem}.{fmt}" for stem in PLOTS)
    for name in made:
        assert (out / name).read_bytes()[:16].startswith(MAGIC[fmt]), name
        shown = f"[{name}]({name})" if fmt == "pdf" else f"![{name}]({name})"
        assert text.count(f"[{name}]({name})") == 1 and shown in text


def test_report_with_several_formats_shows_each_plot_once(sweep, tmp_path):
    text = report.report([sweep], tmp_path, formats=["pdf", "svg", "png"])
    assert "![acc_curves.png](acc_curves.png)" in text
    assert "[acc_curves.svg](acc_curves.svg)" in text and "![acc_curves.svg]" not in text
    assert "[acc_curves.pdf](acc_curves.pdf)" in text and "![acc_curves.pdf]" not in text


def test_report_without_plots(sweep, tmp_path):
    text = report.report([sweep], tmp_path, formats=[])
    assert not [p for p in tmp_path.iterdir() if p.suffix[1:] in MAGIC]
    assert "![" not in text and (tmp_path / "report.md").exists()
    with pytest.raises(ValueError, match="plots.format: 'gif'"):
        report.report([sweep], tmp_path, formats=["gif"])


def test_report_plots_default_to_the_runs_plots_format(sweep, tmp_path):
    for run in ("0", "1"):  # the runs record plots.format in their .hydra/config.yaml
        (sweep / run / ".hydra" / "config.yaml").write_text("plots:\n  format: [svg]\n")
    report.report([sweep], tmp_path / "out")
    made = {p.suffix for p in (tmp_path / "out").iterdir()} - {".md", ".csv", ".tex"}
    assert made == {".svg", ".png"}  # runs 2 and 10 say nothing: png, the default
    for run in ("2", "10"):
        (sweep / run / ".hydra" / "config.yaml").write_text("plots:\n  format: []\n")
    report.report([sweep], tmp_path / "out2")
    assert {p.suffix for p in (tmp_path / "out2").iterdir()} == {".md", ".csv", ".tex", ".svg"}


def test_report_command_line_format(sweep, tmp_path):
    command = [sys.executable, "-m", "clrun.report", str(sweep), "--out", str(tmp_path)]
    p = subprocess.run(
        [*command, "--format", "pdf"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr
    assert sorted(q.name for q in tmp_path.glob("*.pdf")) == sorted(f"{s}.pdf" for s in PLOTS)
    assert not list(tmp_path.glob("*.png"))


def test_report_matrices_grey_untrained_cells_and_number_from_one(sweep):
    groups = report.group_runs(report.find_runs([sweep]))
    fig = report._mean_acc_matrices(groups)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255
    grey = np.array([int(plots.UNTRAINED[k : k + 2], 16) / 255 for k in (1, 3, 5)])
    for ax in fig.axes[:2]:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2"]
        assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "2"]
        for (i, j), is_grey in {(0, 1): True, (0, 0): False, (1, 0): False}.items():
            x, y = ax.transData.transform((j - 0.3, i - 0.3))
            rgb = image[int(round(fig.bbox.height - y)), int(round(x))]
            assert (np.abs(rgb - grey).max() < 0.02) == is_grey, (ax.get_title(), i, j, rgb)


def test_report_curves_number_from_one_with_the_legend_outside(sweep):
    groups = report.group_runs(report.find_runs([sweep]))
    fig = report._acc_curves(groups)
    fig.canvas.draw()
    (ax,) = fig.axes
    assert list(ax.get_xticks()) == [1, 2]
    assert list(ax.get_lines()[0].get_xdata()) == [1, 2]
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1 and legend.x1 <= fig.bbox.x1 + 1
