"""Run ``conf/experiment/`` presets and compare them with the numbers their papers publish.

    python scripts/reproduce.py --all --seeds 0,1,2       # every preset, 3 seeds each
    python scripts/reproduce.py --presets vandeven2022/class_er --seeds 0
    python scripts/reproduce.py --all --quick              # smoke check: 2 experiences of 2 steps
    python scripts/reproduce.py --all --seeds 0 --override device=cuda
    python scripts/reproduce.py --check                    # the records agree with the presets

Presets live one folder per paper, ``conf/experiment/<paper>/<preset>.yaml`` (``protocol*.yaml``
there are the shared protocols the presets include, not presets), and are named
``<paper>/<preset>``. Each (preset, seed) runs as its own process, ``clrun
experiment=<paper>/<preset> seed=<s> threads=<t> hydra.run.dir=<out>/<paper>/<preset>/seed<s>``,
one after the other (``--quick`` runs go to ``<out>/quick/``). A run directory whose
``summary.json`` records a completed run of the same seed and overrides, made with the config
they compose today (``threads`` and the other run-management keys aside), is reused (``--force``
reruns it; a run made with another config, say before the preset was edited, is moved aside to
``seed<s>.stale-<time>`` and rerun), so the same command continues an interrupted reproduction;
``--report-only`` runs nothing. The script then reads every ``summary.json`` and prints a
Markdown table (also written to ``<out>/reproduce.md``): preset, metric, our mean ± std (n
seeds), the published mean ± spread, the difference, and a verdict.

Each number is written in one place. The published number lives in the preset's header, on one
line the tests check, with its source on the next:

    # published: final_avg_acc 88.79 ± 0.20 % (s.e.m. over 20 seeds)
    # source: Table 2 as transcribed by a third party (...)

(``<metric of summary.json> <mean> ± <spread> % (s.e.m.|std|c.i. over <n> seeds)``; ``c.i.``: the
paper prints a 95 % confidence interval of the mean, read as 1.96 s.e.m.; a source that could not
be checked says ``unverified``). Where no text giving the paper's number could be read, the line
says so instead of holding a number, and its source line says what was looked at:

    # published: avg_incremental_acc none
    # source: no readable table gives the number (...)

Such a preset runs and is tabulated without a verdict. The runner never reads these lines; the
config stays free of keys that no code reads. Our numbers live in the paper's results record, ``conf/experiment/<paper>/README.md``.
``--check`` (runs nothing) reads every record's tables and exits 1, listing the mismatches,
unless each row names an existing preset, shows exactly the published mean ± spread of that
preset's header, or ``none`` where the header has no number (so the two cannot drift), says ``unverified source`` in its verdict where the
header's source is unverified, and every preset has exactly one row in its paper's record.

Verdict. The difference is compared with its standard error: the published s.e.m. combined with
ours, std/√n, where with fewer than two seeds of ours the published per-seed std (s.e.m.·√n)
stands in for our std. ``within noise`` when |difference| ≤ 2 standard errors, otherwise ``off``.
``--quick`` runs are smoke checks (2 experiences, 2 steps each, small Fisher/importance samples):
the table says ``quick`` instead of a verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "conf" / "experiment"
RUN_MANAGEMENT = ("resume", "threads", "deterministic", "data_dir", "checkpoint", "hydra", "seed")
PUBLISHED = re.compile(
    r"^# published: (?P<metric>\w+) (?P<mean>-?[\d.]+) ± (?P<spread>[\d.]+) (?P<pct>%)? ?"
    r"\((?P<kind>s\.e\.m\.|std|c\.i\.) over (?P<n>\d+) seeds\)\s*$",
    re.MULTILINE,
)
# a preset whose paper gives no number that could be read: the metric it would be compared on
NO_NUMBER = re.compile(r"^# published: (?P<metric>\w+) none\s*$", re.MULTILINE)
# the "# source:" line right under the published one, with its continuation comment lines
SOURCE = re.compile(r"\A\s*^# source: (?P<text>.*(?:\n# .*)*)", re.MULTILINE)
# --quick: overrides applied when the preset's composed config has the key
QUICK = {
    "strategy.iterations": 2,
    "strategy.fisher_samples": 32,
    "strategy.importance_samples": 32,
    "benchmark.n_experiences": 2,
}


@dataclass
class Published:
    metric: str  # a field of summary.json
    mean: float | None  # as a fraction, like summary.json; None: "none", no number could be read
    spread: float = 0.0  # the published ± (fraction)
    kind: str = "std"  # "s.e.m." | "std" | "c.i." (a 95 % confidence interval of the mean)
    n: int = 1  # seeds behind the published number
    as_written: str = ""  # "<mean> ± <spread>" exactly as the header writes it (in %), or "none"
    source: str = ""  # the header's "# source:" text ("" if it has none)

    @property
    def sem(self) -> float:
        if self.kind == "c.i.":
            return self.spread / 1.96
        return self.spread if self.kind == "s.e.m." else self.spread / math.sqrt(self.n)

    @property
    def seed_std(self) -> float:
        return self.spread if self.kind == "std" else self.sem * math.sqrt(self.n)

    @property
    def unverified(self) -> bool:
        """Whether the header says its source could not be checked against the paper."""
        return self.mean is not None and "unverified" in self.source

    def text(self) -> str:
        if self.mean is None:
            return "none"
        return f"{100 * self.mean:.2f} ± {100 * self.spread:.2f} ({self.kind}, n={self.n})"


def presets() -> list[str]:
    """Every preset of the experiment group, ``<paper>/<preset>`` (``protocol*.yaml`` files are
    the protocols the presets include, not presets)."""
    return sorted(
        p.relative_to(PRESETS).with_suffix("").as_posix()
        for p in PRESETS.glob("*/*.yaml")
        if not p.stem.startswith("protocol")
    )


def header(preset: str) -> str:
    """The comment block above a preset's ``defaults:`` list."""
    return (PRESETS / f"{preset}.yaml").read_text().split("\ndefaults:")[0]


def published(preset: str) -> Published:
    """The ``# published:`` line of a preset's header, and the ``# source:`` lines under it."""
    text = header(preset)
    m = PUBLISHED.search(text)
    if m is None:
        none = NO_NUMBER.search(text)
        source = SOURCE.search(text[none.end() :]) if none else None
        if source is None:
            raise ValueError(
                f"conf/experiment/{preset}.yaml has no line '# published: <metric> <mean> ± "
                "<spread> % (s.e.m.|std|c.i. over <n> seeds)', nor '# published: <metric> none' "
                "with a '# source:' line under it saying what was looked at"
            )
        text = " ".join(source["text"].replace("\n# ", " ").split())
        return Published(metric=none["metric"], mean=None, as_written="none", source=text)
    scale = 0.01 if m["pct"] else 1.0
    source = SOURCE.search(text[m.end() :])
    return Published(
        metric=m["metric"],
        mean=float(m["mean"]) * scale,
        spread=float(m["spread"]) * scale,
        kind=m["kind"],
        n=int(m["n"]),
        as_written=f"{m['mean']} ± {m['spread']}",
        source=" ".join(source["text"].replace("\n# ", " ").split()) if source else "",
    )


def composed(overrides: list[str]):
    """The config clrun composes from these overrides (interpolations unresolved)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def experiment_config(cfg) -> dict:
    """A composed config without its run-management keys: what decides a run's numbers."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(cfg, resolve=False)
    return {k: v for k, v in tree.items() if k not in RUN_MANAGEMENT}


def quick_overrides(preset: str) -> list[str]:
    """The QUICK overrides whose keys exist in the preset's composed config."""
    from omegaconf import OmegaConf

    cfg = composed([f"experiment={preset}"])
    missing = object()
    return [
        f"{k}={v}"
        for k, v in QUICK.items()
        if OmegaConf.select(cfg, k, default=missing) is not missing
    ]


def job_key(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if o.split("=", 1)[0].split(".")[0] not in RUN_MANAGEMENT)


def same_config(run_dir: Path, args: list[str]) -> bool:
    """Whether the run was made with the config these overrides compose today (a preset or a
    protocol edited since the run makes it stale)."""
    from omegaconf import OmegaConf

    try:
        ran = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    except OSError:
        return False
    return experiment_config(ran) == experiment_config(composed(args))


def read_summary(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def run_one(
    preset: str, seed: int, run_dir: Path, overrides: list[str], threads: int, force: bool
) -> dict | None:
    """Run (or reuse) one preset and seed; return its summary (None if it did not complete)."""
    args = [f"experiment={preset}", f"seed={seed}", *overrides]
    done = read_summary(run_dir)
    stale = done is not None and not same_config(run_dir, args)
    same = (
        done is not None
        and not stale
        and done.get("seed") == seed
        and job_key(done.get("overrides", [])) == job_key(args)
    )
    if not force and same and done.get("status") == "completed":
        print(f"  {preset} seed {seed}: reused {run_dir}")
        return done
    if stale:  # made with another config: kept aside, never overwritten
        aside = run_dir.with_name(f"{run_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"  {preset} seed {seed}: {run_dir} was made with another config, moved to {aside}")
    cmd = [sys.executable, "-m", "clrun", *args, f"threads={threads}", f"hydra.run.dir={run_dir}"]
    if force:
        cmd.append("resume=false")
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ)
    summary = read_summary(run_dir)
    status = summary.get("status") if summary else "no summary"
    failure = "" if p.returncode == 0 else f" (exit {p.returncode}, see {run_dir}.log)"
    print(f"  {preset} seed {seed}: {status} in {time.perf_counter() - t0:.0f}s{failure}")
    return summary if p.returncode == 0 and status == "completed" else None


def verdict(ours: list[float], pub: Published) -> tuple[float, str]:
    """(our mean − published mean, verdict) as explained in the module docstring."""
    mean = statistics.fmean(ours)
    our_std = statistics.stdev(ours) if len(ours) >= 2 else pub.seed_std
    se = math.sqrt(pub.sem**2 + our_std**2 / len(ours))
    diff = mean - pub.mean
    z = abs(diff) / se if se > 0 else math.inf
    return diff, ("within noise" if z <= 2 else "off") + f" ({z:.1f} s.e.)"


def table(results: dict[str, list[float]], failed: dict[str, int], quick: bool) -> str:
    lines = [
        "| preset | metric | ours: mean ± std (n) | published: mean ± spread | difference "
        "| verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for preset, values in results.items():
        pub = published(preset)
        if not values:
            v = "failed" if failed.get(preset) else "not run"
            lines.append(f"| {preset} | {pub.metric} | no completed run | {pub.text()} | | {v} |")
            continue
        std = f"{100 * statistics.stdev(values):.2f}" if len(values) >= 2 else "–"
        ours = f"{100 * statistics.fmean(values):.2f} ± {std} (n={len(values)})"
        if pub.mean is None:  # the paper's number could not be read: nothing to compare with
            difference, v = "", "no published number"
        else:
            diff, v = verdict(values, pub)
            difference = f"{100 * diff:+.2f}"
        if quick:
            v = "quick (smoke check, not comparable)"
        if failed.get(preset):
            v += f"; {failed[preset]} run(s) failed"
        lines.append(f"| {preset} | {pub.metric} | {ours} | {pub.text()} | {difference} | {v} |")
    return "\n".join(lines) + "\n\nAll accuracies in %; spreads as published.\n"


def record_rows(record: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of every Markdown table in a results record, as (line number, {column: cell}),
    the columns named by the table's header row, lower-cased."""
    rows = []
    lines = record.read_text().splitlines()
    columns: list[str] | None = None
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            columns = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if columns is None:
            columns = [c.lower() for c in cells]
        elif not all(set(c) <= set("-: ") for c in cells):  # not the separator row
            rows.append((i + 1, dict(zip(columns, cells, strict=False))))
    return rows


def check_records() -> list[str]:
    """Mismatches between the results records and the presets' headers (see the docstring)."""
    problems = []
    known = set(presets())
    rows_of: dict[str, list[str]] = {p: [] for p in known}
    papers = sorted({p.split("/")[0] for p in known})
    for paper in papers:
        record = PRESETS / paper / "README.md"
        where = record.relative_to(ROOT)
        if not record.exists():
            problems.append(f"{where}: missing (the results record of {paper}'s presets)")
            continue
        for line, row in record_rows(record):
            first = next(iter(row.values()), "")
            name = first.strip("`")
            if not (first.startswith("`") and first.endswith("`")) or "/" not in name:
                continue  # a table of something else
            if name not in known:
                problems.append(f"{where}:{line}: {name} is not a preset")
                continue
            rows_of[name].append(f"{where}:{line}")
            pub = published(name)
            shown = next((v for k, v in row.items() if k.startswith("published")), None)
            if shown != pub.as_written:
                problems.append(
                    f"{where}:{line}: {name} shows published {shown!r}, its header says "
                    f"{pub.as_written!r}"
                )
            if pub.unverified and "unverified source" not in row.get("verdict", ""):
                problems.append(
                    f"{where}:{line}: {name}'s source is unverified; its verdict must say "
                    "'unverified source'"
                )
    for name, where in sorted(rows_of.items()):
        if len(where) != 1:
            seen = ", ".join(where) if where else "no row"
            problems.append(f"{name}: one row expected in its paper's README.md, found {seen}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--presets", help="comma-separated presets, <paper>/<preset>")
    which.add_argument("--all", action="store_true", help="every preset")
    which.add_argument(
        "--check",
        action="store_true",
        help="run nothing: check that the results records show each preset's published number",
    )
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    ap.add_argument("--out", default="outputs/reproduce", help="root of the run directories")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (default: 1)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 2 experiences of 2 steps, small Fisher/importance samples",
    )
    ap.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra clrun override for every run (repeatable), e.g. device=cuda",
    )
    ap.add_argument("--force", action="store_true", help="rerun runs that already completed")
    ap.add_argument("--report-only", action="store_true", help="run nothing: tabulate what exists")
    a = ap.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as runs finish

    if a.check:
        problems = check_records()
        for problem in problems:
            print(problem)
        if problems:
            print(f"reproduce.py --check: {len(problems)} mismatch(es)", file=sys.stderr)
            return 1
        print(
            f"reproduce.py --check: the records show the published number of all "
            f"{len(presets())} presets"
        )
        return 0

    names = presets() if a.all else [p.strip() for p in a.presets.split(",") if p.strip()]
    unknown = [p for p in names if p not in presets()]
    if unknown:
        ap.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(presets())}")
    for p in names:
        published(p)  # every preset names its published number before anything runs
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out) / ("quick" if a.quick else "")
    if not out.is_absolute():
        out = Path.cwd() / out

    results: dict[str, list[float]] = {}
    failed: dict[str, int] = {}
    for p in names:
        overrides = (quick_overrides(p) if a.quick else []) + a.override
        metric = published(p).metric
        results[p] = []
        for s in seeds:
            run_dir = out / p / f"seed{s}"  # <out>/<paper>/<preset>/seed<s>
            if a.report_only:
                summary = read_summary(run_dir)
                summary = summary if summary and summary.get("status") == "completed" else None
            else:
                summary = run_one(p, s, run_dir, overrides, a.threads, a.force)
            if summary is None or summary.get(metric) is None:
                if not a.report_only:
                    failed[p] = failed.get(p, 0) + 1
            else:
                results[p].append(float(summary[metric]))
    report = table(results, failed, a.quick)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.md").write_text(report)
    print()
    print(report)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
