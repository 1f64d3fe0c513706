"""clrun-report on a hand-written sweep directory: grouping, mean ± std, failed and missing runs."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clrun import report

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


def test_run_management_keys_are_the_runners():
    import clrun.checkpoint
    import clrun.run

    runner = getattr(clrun.checkpoint, "RUN_MANAGEMENT_KEYS", None) or clrun.run.RUN_MANAGEMENT_KEYS
    assert set(report.RUN_MANAGEMENT_KEYS) == set(runner)


def test_unlearning_runs_get_their_columns_and_their_reference_is_not_a_run(tmp_path):
    s = tmp_path / "sweep"
    for seed, (forgotten, js) in enumerate([(0.5, 0.1), (0.7, 0.3)]):
        block = {"events": [{"after_experience": 1}], "final_forgotten_acc": forgotten,
                 "final_retained_acc": 0.9, "reference": {"mean_js_divergence": js}}  # fmt: skip
        make_run(s / str(seed), ["strategy=amnesiac_lwf", f"seed={seed}"],
                 {**done(0.8, 0.1, -0.1, 0.0, 5.0), "unlearning": block}, R0)  # fmt: skip
        make_run(s / str(seed) / "reference", ["strategy=amnesiac_lwf", f"seed={seed}"],
                 done(0.2, 0.1, -0.1, 0.0, 5.0), R0)  # fmt: skip
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
