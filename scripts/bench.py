"""clrun against a bare, hand-written PyTorch loop doing the same work, side by side.

    python scripts/bench.py                       # all workloads, 3 interleaved repeats, 1 thread
    python scripts/bench.py --workloads mnist_naive_b128 --repeats 5 --threads 2

For every workload the script runs, as separate processes and interleaved (A B A B ...):
``clrun ...`` (the real CLI: Hydra, checks, metrics, checkpoints, plots) and ``python
scripts/bench.py --bare ...`` (the reference loop below: the same data tensors, the same model
initialisation, the same minibatch order and optimiser, the same evaluation after every
experience; no framework). It reports the median whole-process wall time and training time of
each, their ratio clrun/bare, samples/s, peak RSS, and the final average accuracy of both (the
two must agree: same work). Output: a Markdown table on stdout (and ``--out FILE``).

This is a benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name → (strategy, batch size, extra clrun overrides)
WORKLOADS: dict[str, tuple[str, int, list[str]]] = {
    f"mnist_{s}_b{b}": (s, b, []) for s in ("naive", "replay", "lwf", "ewc") for b in (32, 128)
}
REPLAY_SIZE = 500


def clrun_command(
    strategy: str, batch: int, threads: int, run_dir: str, extra: list[str]
) -> list[str]:
    cmd = [sys.executable, "-m", "clrun", "benchmark=split_mnist", f"strategy={strategy}",
           "model=mlp", "optimizer=adam", "optimizer.lr=0.001", "strategy.epochs=1",
           f"strategy.batch_size={batch}", "strategy.eval_batch_size=1000", f"threads={threads}",
           "seed=0", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    if strategy == "replay":
        cmd += ["buffer=class_balanced", f"buffer.max_size={REPLAY_SIZE}"]
    return cmd


def run_once(cmd: list[str], result_file: Path, is_clrun: bool) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})  # fmt: skip
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    r = json.loads(result_file.read_text())
    if is_clrun:
        r = {"train_s": r["train_time_s"], "acc": r["final_avg_acc"],
             "samples_per_s": r["samples_per_s"], "peak_rss_mb": r["peak_rss_mb"]}  # fmt: skip
    return {**r, "wall_s": wall}


def benchmark(names: list[str], repeats: int, threads: int) -> list[dict]:
    rows = []
    for name in names:
        strategy, batch, extra = WORKLOADS[name]
        runs: dict[str, list[dict]] = {"clrun": [], "bare": []}
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                run_dir = Path(tmp) / "run"
                runs["clrun"].append(run_once(
                    clrun_command(strategy, batch, threads, str(run_dir), extra),
                    run_dir / "summary.json", is_clrun=True))  # fmt: skip
                out = Path(tmp) / "bare.json"
                runs["bare"].append(run_once(
                    [sys.executable, __file__, "--bare", strategy, "--batch", str(batch),
                     "--threads", str(threads), "--result", str(out)], out, is_clrun=False))  # fmt: skip
        med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
        rows.append(
            {"workload": name, **{f"{k}_{m}": v for k, d in med.items() for m, v in d.items()}}
        )
        print(f"{name}: clrun {med['clrun']['wall_s']:.2f}s / bare {med['bare']['wall_s']:.2f}s",
              file=sys.stderr)  # fmt: skip
    return rows


def table(rows: list[dict], threads: int, repeats: int) -> str:
    lines = [
        f"Split MNIST, MLP 400-400, Adam, 1 epoch per experience, {threads} thread(s), "
        f"median of {repeats} interleaved runs.",
        "",
        "| workload | whole process clrun / bare (s) | ratio | training clrun / bare (s) | ratio "
        "| samples/s clrun | peak RSS clrun / bare (MB) | final acc clrun / bare |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['clrun_wall_s']:.2f} / {r['bare_wall_s']:.2f} "
            f"| {r['clrun_wall_s'] / r['bare_wall_s']:.3f} "
            f"| {r['clrun_train_s']:.2f} / {r['bare_train_s']:.2f} "
            f"| {r['clrun_train_s'] / r['bare_train_s']:.3f} | {r['clrun_samples_per_s']:.0f} "
            f"| {r['clrun_peak_rss_mb']:.0f} / {r['bare_peak_rss_mb']:.0f} "
            f"| {r['clrun_acc']:.4f} / {r['bare_acc']:.4f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- the bare loop


def bare(strategy: str, batch: int, threads: int, result: Path) -> None:
    """Split MNIST class-incremental, written out by hand."""
    import copy

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cache = (
        Path(os.environ.get("CLRUN_DATA", Path.home() / ".cache" / "clrun"))
        / "mnist"
        / "arrays.npz"
    )
    with np.load(cache) as z:
        arrays = {k: torch.from_numpy(z[k]) for k in ("x_train", "y_train", "x_test", "y_test")}

    def split(x, y):
        return [(x[(y // 2) == i].unsqueeze(1), y[(y // 2) == i].long()) for i in range(5)]

    train, test = (
        split(arrays["x_train"], arrays["y_train"]),
        split(arrays["x_test"], arrays["y_test"]),
    )
    mean, std = 0.1307 * 255, 0.3081 * 255

    def prep(x):
        return (x.float() - mean) / std

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400),
                          nn.ReLU(), nn.Linear(400, 10))  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=0.001)
    gen = torch.Generator().manual_seed(0)
    mem_x = mem_y = None
    teacher, seen = None, []
    fisher, anchor = [], []
    train_s, samples = 0.0, 0
    for x, y in train:
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch):
            idx = order[s : s + batch]
            xb, yb = x[idx], y[idx]
            if strategy == "replay" and mem_y is not None:
                m = torch.randperm(len(mem_y))[: len(idx)]
                xb, yb = torch.cat([xb, mem_x[m]]), torch.cat([yb, mem_y[m]])
            inp = prep(xb)
            out = model(inp)
            loss = F.cross_entropy(out, yb)
            if strategy == "lwf" and teacher is not None:
                with torch.no_grad():
                    old = teacher(inp)[:, seen]
                loss = loss + F.kl_div(F.log_softmax(out[:, seen] / 2, 1), F.log_softmax(old / 2, 1),
                                       log_target=True, reduction="batchmean")  # fmt: skip
            if strategy == "ewc":
                for f, a in zip(fisher, anchor, strict=True):
                    loss = loss + 0.5 * 5000 * sum((fi * (p - ai) ** 2).sum()
                                                   for fi, p, ai in zip(f, model.parameters(), a, strict=True))  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            samples += len(yb)
        if strategy == "replay":  # class-balanced memory, random selection
            xs = torch.cat([mem_x, x]) if mem_y is not None else x
            ys = torch.cat([mem_y, y]) if mem_y is not None else y
            classes = ys.unique()
            per = REPLAY_SIZE // len(classes)
            keep = torch.cat([torch.nonzero(ys == c).flatten()[torch.randperm(int((ys == c).sum()))[:per]]
                              for c in classes])  # fmt: skip
            mem_x, mem_y = xs[keep], ys[keep]
        if strategy == "lwf":
            teacher = copy.deepcopy(model).eval()
            seen = sorted(set(seen) | set(y.unique().tolist()))
        if strategy == "ewc":
            from torch.func import functional_call, grad, vmap

            params = {n: p.detach() for n, p in model.named_parameters()}

            def nll(p, xi, yi):
                return F.cross_entropy(
                    functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)
                )

            model.eval()
            f = [torch.zeros_like(p) for p in params.values()]
            for s in range(0, len(y), 64):
                g = vmap(grad(nll), in_dims=(None, 0, 0))(
                    params, prep(x[s : s + 64]), y[s : s + 64]
                )
                for fi, gi in zip(f, g.values(), strict=True):
                    fi += gi.pow(2).sum(0)
            fisher.append([fi / len(y) for fi in f])
            anchor.append([p.clone() for p in params.values()])
        train_s += time.perf_counter() - t0
        model.eval()
        with torch.inference_mode():
            accs = []
            for xt, yt in test:
                correct = 0
                for s in range(0, len(yt), 1000):
                    correct += int(
                        (model(prep(xt[s : s + 1000])).argmax(1) == yt[s : s + 1000]).sum()
                    )
                accs.append(correct / len(yt))
    result.write_text(json.dumps({
        "train_s": train_s, "acc": sum(accs) / len(accs), "samples_per_s": samples / train_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated names")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--bare", metavar="STRATEGY", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.bare:
        bare(a.bare, a.batch, a.threads, a.result)
        return
    names = a.workloads.split(",")
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        ap.error(f"unknown workloads {unknown}; known: {', '.join(WORKLOADS)}")
    md = table(benchmark(names, a.repeats, a.threads), a.threads, a.repeats)
    print(md)
    if a.out:
        a.out.write_text(md + "\n")


if __name__ == "__main__":
    main()
