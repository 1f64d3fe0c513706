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


# --- runs.csv, labels, --group-by, --x, LaTeX, the sweep callback --------------------------------

DATA = Path(__file__).resolve().parent / "data"
STRATEGY = {  # the strategy part of each option's .hydra/config.yaml
    "naive": "strategy:\n  epochs: 1\n  components: {}\n",
    "replay": (
        "strategy:\n  epochs: 1\n  replay_batch_size: null\n"
        "  components:\n    replay:\n      _target_: clrun.strategies.Replay\n"
    ),
}


def make_config(d: Path, strategy: str, max_size: int, seed: int, threads: int) -> None:
    """A .hydra/config.yaml as Hydra writes it: shared keys, the swept ones, and run-management
    keys that differ between runs but are not settings (threads, data_dir)."""
    (d / ".hydra" / "config.yaml").write_text(
        f"seed: {seed}\nthreads: {threads}\ndata_dir: /data/{seed}\n"
        "benchmark:\n  name: split_mnist\n  n_experiences: 2\n"
        + STRATEGY[strategy]
        + f"buffer:\n  _target_: clrun.buffers.ReservoirBuffer\n  max_size: {max_size}\n"
        "optimizer:\n  lr: 0.001\nplots:\n  format: [png]\n"
    )


def acc(strategy: str, max_size: int, seed: int) -> float:
    """Known numbers: replay beats naive, a bigger buffer helps replay, seeds differ by 0.02."""
    return 0.5 + (0.2 + max_size / 5000 if strategy == "replay" else 0.0) + 0.02 * seed


def full_summary(a: float, seed: int) -> dict:
    """A summary with every metric family: test, validation, task-IL, times, memory."""
    return {
        **done(a, 0.3 - a / 4, -0.3 + a / 4, 0.01, 10.0 + seed),
        "strategy": None,  # set by the caller: the option name the runner records
        "seed": seed,
        "avg_incremental_acc": a + 0.1,
        "val_final_avg_acc": a - 0.01,
        "val_forgetting": 0.3 - a / 4 + 0.01,
        "task_final_avg_acc": a + 0.2,
        "train_time_s": 8.0,
        "eval_time_s": 1.0,
        "samples_per_s": 1000.0,
        "peak_rss_mb": 500.0,
        "steps": 40,
        "versions": {"clrun": "0.1"},
    }


@pytest.fixture
def sweep2x2(tmp_path):
    """strategy × buffer.max_size × 2 seeds as ``clrun -m debug=default strategy=naive,replay
    buffer.max_size=200,500 seed=0,1`` makes it, and a ninth job that failed."""
    s, job = tmp_path / "sweep2x2", 0
    for strategy in ("naive", "replay"):
        for max_size in (200, 500):
            for seed in (0, 1):
                overrides = ["debug=default", f"strategy={strategy}"]
                overrides += [f"buffer.max_size={max_size}", f"seed={seed}"]
                summary = {
                    **full_summary(acc(strategy, max_size, seed), seed),
                    "strategy": strategy,
                }
                make_run(s / str(job), overrides, summary, R0 if strategy == "naive" else R1)
                make_config(s / str(job), strategy, max_size, seed, threads=1 + job % 2)
                job += 1
    failed = {"status": "failed", "error": "TrainingDiverged: loss nan", "final_avg_acc": 0.1}
    overrides = ["debug=default", "strategy=naive", "buffer.max_size=200", "seed=2"]
    make_run(s / "8", overrides, {**failed, "strategy": "naive", "seed": 2})
    make_config(s / "8", "naive", 200, 2, threads=1)
    return s


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_runs_csv_has_a_column_per_differing_setting_and_every_metric(sweep2x2, tmp_path):
    report.report([sweep2x2], tmp_path, formats=[])
    header, rows = read_csv(tmp_path / "runs.csv")
    settings = header[3 : header.index("seed")]
    assert header[:3] == ["run", "status", "group"]
    assert settings[:2] == ["strategy", "buffer.max_size"]  # the swept overrides first
    assert set(settings[2:]) == {
        "strategy.replay_batch_size",
        "strategy.components.replay._target_",
    }
    for shared in ("debug", "benchmark.name", "optimizer.lr", "strategy.epochs", "threads"):
        assert shared not in header  # the same in every run, or run management
    assert header[header.index("seed") + 1 :] == [
        *("final_avg_acc", "avg_incremental_acc", "forgetting", "bwt", "fwt"),
        *("val_final_avg_acc", "val_forgetting", "task_final_avg_acc"),
        *("wall_time_s", "train_time_s", "eval_time_s", "samples_per_s", "peak_rss_mb"),
    ]  # no peak_gpu_mem_mb: no run has it
    assert [r["run"] for r in rows] == [f"sweep2x2/{j}" for j in range(9)]  # relative to out
    row = rows[7]  # replay, 500, seed 1
    assert (row["status"], row["group"]) == ("completed", "strategy=replay buffer.max_size=500")
    assert (row["strategy"], row["buffer.max_size"], row["seed"]) == ("replay", "500", "1")
    assert row["strategy.components.replay._target_"] == "clrun.strategies.Replay"
    assert float(row["final_avg_acc"]) == pytest.approx(acc("replay", 500, 1))
    assert float(row["val_final_avg_acc"]) == pytest.approx(acc("replay", 500, 1) - 0.01)
    assert rows[0]["strategy.components.replay._target_"] == ""  # naive has no such key
    failed = rows[8]  # not completed: its settings, no metrics (not even the partial ones)
    assert (failed["status"], failed["seed"], failed["buffer.max_size"]) == ("failed", "2", "200")
    assert {failed[k] for k in header[header.index("seed") + 1 :]} == {""}


def test_labels_name_only_the_overrides_that_differ(sweep2x2, tmp_path):
    groups = report.group_runs(report.find_runs([sweep2x2]))
    assert {g: len(runs) for g, runs in groups.items()} == {
        "strategy=naive buffer.max_size=200": 2,
        "strategy=naive buffer.max_size=500": 2,
        "strategy=replay buffer.max_size=200": 2,
        "strategy=replay buffer.max_size=500": 2,
    }
    text = report.report([sweep2x2], tmp_path, formats=[])
    assert "Every run: `debug=default`." in text
    assert "| strategy=replay buffer.max_size=500 | 2 |" in text
    one = [report.Run(Path("a"), {}, ["debug=default", "strategy=lwf", "seed=0"])]
    assert list(report.group_runs(one)) == []  # not completed: no group
    one[0].summary["status"] = "completed"
    assert list(report.group_runs(one)) == ["debug=default strategy=lwf"]  # nothing differs


def test_group_by_averages_over_the_other_keys(sweep2x2):
    runs = report.find_runs([sweep2x2])
    groups = report.group_runs(runs, by=["strategy"])
    assert {g: len(r) for g, r in groups.items()} == {"strategy=naive": 4, "strategy=replay": 4}
    rows = {r["group"]: r for r in report.table_rows(groups)}
    replay = [acc("replay", m, s) for m in (200, 500) for s in (0, 1)]
    assert rows["strategy=replay"]["final_avg_acc"][:2] == pytest.approx(
        (statistics.mean(replay), statistics.stdev(replay))
    )
    by_size = report.group_runs(runs, by=["buffer.max_size", "seed"])
    assert list(by_size)[:2] == ["buffer.max_size=200 seed=0", "buffer.max_size=200 seed=1"]
    with pytest.raises(ValueError, match="--group-by buffer.size: no run has this key"):
        report.group_runs(runs, by=["buffer.size"])


def test_x_plots_the_metric_against_a_hyperparameter(sweep2x2, tmp_path):
    runs = report.find_runs([sweep2x2])
    groups = report.group_runs(runs, drop="buffer.max_size")
    assert list(groups) == ["strategy=naive", "strategy=replay"]
    points = report.sweep_points(groups, "buffer.max_size", "final_avg_acc")
    assert points["strategy=replay"] == {
        m: pytest.approx([acc("replay", m, 0), acc("replay", m, 1)]) for m in (200.0, 500.0)
    }
    fig = plots.sweep_curves(points, "buffer.max_size", "final avg acc")
    (ax,) = fig.axes
    line = ax.get_lines()[1]
    assert list(line.get_xdata()) == [200, 500] and ax.get_xscale() == "linear"
    means = [statistics.mean([acc("replay", m, 0), acc("replay", m, 1)]) for m in (200, 500)]
    assert list(line.get_ydata()) == pytest.approx(means)
    lr = plots.sweep_curves({"a": {1e-4: [0.5, 0.6], 1e-1: [0.7]}}, "optimizer.lr", "acc")
    assert lr.axes[0].get_xscale() == "log"  # 1e-4 .. 1e-1: more than a factor 100

    report.main([str(sweep2x2), "--out", str(tmp_path), "--x", "buffer.max_size"])
    assert "![final_avg_acc_vs_buffer.max_size.png]" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "final_avg_acc_vs_buffer.max_size.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):  # not a number: a clear error (argparse: exit 2)
        report.main([str(sweep2x2), "--out", str(tmp_path), "--x", "strategy", "--format", ""])


def test_metric_picks_what_the_bars_and_curves_plot(sweep2x2, tmp_path):
    cmd = [str(sweep2x2), "--out", str(tmp_path), "--format", "svg"]
    report.main([*cmd, "--metric", "val_final_avg_acc", "--x", "buffer.max_size"])
    made = sorted(p.name for p in tmp_path.glob("*.svg"))
    assert made == sorted(
        ["acc_curves.svg", "acc_matrices.svg", "val_final_avg_acc.svg"]
        + ["val_final_avg_acc_vs_buffer.max_size.svg"]
    )
    with pytest.raises(ValueError, match="--metric val_bwt: no completed run has it"):
        report.report([sweep2x2], tmp_path, formats=[], metric_key="val_bwt")


def test_validation_beside_test_and_a_task_il_column(sweep2x2, tmp_path):
    text = report.report([sweep2x2], tmp_path, formats=[])
    header = next(line for line in text.splitlines() if line.startswith("| group"))
    assert header == (
        "| group | n | final avg acc (val) | final avg acc (test) | task-IL acc "
        "| forgetting (val) | forgetting (test) | BWT | FWT | wall time (s) |"
    )
    tex = (tmp_path / "report.tex").read_text()
    assert "final avg acc (val) & final avg acc (test) & task-IL acc" in tex


def golden_runs(s: Path) -> None:
    """Three configurations, two seeds each, with numbers chosen by hand; special characters in
    a label (``_``, ``%``, ``&``, ``#``)."""
    numbers = {  # label → per seed: (acc, forgetting, bwt, fwt, wall, val acc, task acc)
        "strategy=naive": [
            (0.20, 0.80, -0.80, 0.00, 10, 0.21, 0.90),
            (0.22, 0.78, -0.78, 0.0, 12, 0.23, 0.92),
        ],
        "strategy=er_ace": [
            (0.60, 0.30, -0.30, 0.01, 20, 0.62, 0.95),
            (0.64, 0.26, -0.26, 0.03, 22, 0.66, 0.97),
        ],
        "strategy=lwf +note=50%&#1": [
            (0.30, 0.10, -0.10, 0.02, 8, 0.31, 0.93),
            (0.30, 0.12, -0.12, 0.02, 9, 0.29, 0.91),
        ],
    }
    job = 0
    for label, seeds in numbers.items():
        for seed, (a, f, b, w, t, va, ta) in enumerate(seeds):
            extra = {"val_final_avg_acc": va, "task_final_avg_acc": ta}
            make_run(
                s / str(job), [*label.split(), f"seed={seed}"], {**done(a, f, b, w, t), **extra}
            )
            job += 1


def test_latex_table_matches_the_golden_file(tmp_path):
    golden_runs(tmp_path / "runs")
    report.report([tmp_path / "runs"], tmp_path, formats=[])
    tex = (tmp_path / "report.tex").read_text()
    assert tex == (DATA / "report.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert "strategy=er\\_ace" in tex and "note=50\\%\\&\\#1" in tex
    assert "$\\mathbf{0.620 \\pm 0.028}$" in tex  # best final accuracy: er_ace, in bold
    assert "$\\mathbf{0.110 \\pm 0.014}$" in tex  # least forgetting: lwf
    assert "$\\mathbf{8.5 \\pm 0.7}$" in tex  # the shortest wall time: lwf


def test_sweep_callback_writes_the_report_before_the_outcome_exits(sweep2x2, capsys):
    from hydra import compose, initialize_config_dir
    from hydra._internal.callbacks import Callbacks

    from clrun.cli import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", [f"hydra.sweep.dir={sweep2x2}"], return_hydra_config=True)
    names = list(cfg.hydra.callbacks)  # Hydra calls on_multirun_end callbacks last to first
    assert names.index("sweep_report") > names.index("sweep_outcome")
    with pytest.raises(SystemExit) as stop:
        Callbacks(cfg).on_multirun_end(config=cfg)
    assert stop.value.code == 1  # job 8 failed: the sweep still says so, after the report
    out, err = capsys.readouterr()
    assert f"clrun: report of the sweep: {sweep2x2 / 'report.md'}" in out
    assert "1 of 9 runs" in err
    assert (sweep2x2 / "report.md").exists() and (sweep2x2 / "acc_curves.png").exists()
    assert (sweep2x2 / "runs.csv").exists() and (sweep2x2 / "report.tex").exists()


def test_sweep_callback_survives_a_failing_plot(sweep2x2, capsys, monkeypatch):
    from omegaconf import OmegaConf

    from clrun.cli import SweepReport

    def broken(*args, **kwargs):
        raise RuntimeError("no display\nsecond line")

    monkeypatch.setattr(report, "_acc_curves", broken)
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep2x2)}}})
    SweepReport().on_multirun_end(cfg)
    out, err = capsys.readouterr()
    assert err.splitlines() == [
        f"clrun: warning: report of {sweep2x2} without plots: RuntimeError: no display second line"
    ]
    assert "report of the sweep" in out and (sweep2x2 / "report.md").exists()
    assert not list(sweep2x2.glob("*.png"))
    SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": "/nonexistent"}}}))


@pytest.mark.slow
def test_a_real_2x2_multirun_reports_itself(tmp_path):
    from conftest import clrun

    sweep = tmp_path / "sweep"
    p = clrun(
        "-m",
        "debug=default",
        "strategy=naive,replay",
        "buffer.max_size=20,50",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert f"report of the sweep: {sweep / 'report.md'}" in p.stdout
    header, rows = read_csv(sweep / "runs.csv")
    assert header[3:5] == ["strategy", "buffer.max_size"] and len(rows) == 4
    assert {r["group"] for r in rows} == {
        f"strategy={s} buffer.max_size={m}" for s in ("naive", "replay") for m in (20, 50)
    }
    assert "debug" not in header and "threads" not in header
