"""Long streams: does memory or time per experience grow where the method says it should not?

    python scripts/long_stream.py                          # permuted MNIST, 50 experiences
    python scripts/long_stream.py --strategies naive,lwf --experiences 20 --iterations 50

Runs ``clrun benchmark=permuted_mnist benchmark.n_experiences=N`` for each strategy, with a
fixed number of minibatch steps per experience, and reads the per-experience records the run
keeps in its checkpoint (resident memory after each experience, training and evaluation time).
Prints, per strategy, the RSS after experience 5 and after the last, the growth in percent, and
the training time per experience early and late. Methods whose memory grows by definition (EWC
in separate mode keeps one Fisher per experience; GEM one memory per experience) are expected
to grow; their summary.json says by how much. Evaluation time grows with the number of test
experiences by definition (the whole test stream is evaluated after each experience).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def measure(strategy: str, n: int, iterations: int, threads: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "clrun",
            "benchmark=permuted_mnist",
            f"benchmark.n_experiences={n}",
            f"strategy={strategy}",
            f"strategy.iterations={iterations}",
            f"threads={threads}",
            f"hydra.run.dir={tmp}",
            *extra,
        ]
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        timings = torch.load(Path(tmp) / "checkpoint" / "state.pt", weights_only=True)["recorder"][
            "timings"
        ]
    rss = [t["rss_mb"] for t in timings]
    train = [t["train_s"] for t in timings]
    k = min(5, n) - 1
    return {
        "strategy": strategy,
        "rss_5": rss[k],
        "rss_last": rss[-1],
        "growth_pct": 100 * (rss[-1] - rss[k]) / rss[k],
        "train_s_early": statistics.median(train[1:6]),
        "train_s_late": statistics.median(train[-5:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--strategies", default="naive,replay,ewc,lwf,si")
    ap.add_argument("--experiences", type=int, default=50)
    ap.add_argument("--iterations", type=int, default=100, help="minibatch steps per experience")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "overrides", nargs="*", help="more clrun overrides, e.g. model.hidden_sizes=[100]"
    )
    a = ap.parse_args()
    print(
        f"permuted MNIST, {a.experiences} experiences, {a.iterations} steps each, {a.threads} threads\n"
    )
    print(
        "| strategy | RSS after exp 5 (MB) | RSS after last (MB) | growth | train s/exp early | late |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for s in a.strategies.split(","):
        r = measure(s, a.experiences, a.iterations, a.threads, a.overrides)
        print(
            f"| {s} | {r['rss_5']:.0f} | {r['rss_last']:.0f} | {r['growth_pct']:+.1f}% "
            f"| {r['train_s_early']:.3f} | {r['train_s_late']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
