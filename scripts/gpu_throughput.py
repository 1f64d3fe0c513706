"""Training throughput of clrun on a GPU: samples/s for Split MNIST (MLP 400-400) and Split
CIFAR-10-shaped data (``resnet18_reduced``), in fp32 and with bf16 autocast, channels-last and
torch.compile.

    python scripts/gpu_throughput.py                                  # every workload
    python scripts/gpu_throughput.py --mnist .gpu/mnist_train.npz .gpu/mnist_test.npz
    python scripts/gpu_throughput.py --workloads cifar_naive_b256 --epochs 2

Each workload is one ``clrun`` process, one after the other; the table reports the training
throughput over the whole run (``samples_per_s`` of ``summary.json``: samples trained per second
of training time, evaluation excluded), the whole-process wall time and the peak GPU memory.
Split MNIST uses the real data (``benchmark=split_mnist``, or ``--mnist TRAIN TEST``: ``.npz``
files with ``x``, ``y`` through ``benchmark=from_files``, for machines without the dataset cache).
The CIFAR-10-shaped data are generated: 50,000 training and 10,000 test 3×32×32 uint8 images,
each class a random colour pattern plus noise (learnable, so the accuracy column shows the runs
train), because CIFAR-10 itself is not downloadable everywhere. The timing of the first epoch
includes torch.compile's compilation. Output: a Markdown table on stdout (and ``--out FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FAST = ["precision=bf16", "channels_last=true"]
# name → (model family, strategy, batch size, extra overrides)
WORKLOADS: dict[str, tuple[str, str, int, list[str]]] = {
    "mnist_naive_b128": ("mnist", "naive", 128, []),
    "mnist_naive_b32": ("mnist", "naive", 32, []),
    "mnist_replay_b128": ("mnist", "replay", 128, []),
    "cifar_naive_b32": ("cifar", "naive", 32, []),
    "cifar_naive_b32_bf16_cl": ("cifar", "naive", 32, FAST),
    "cifar_naive_b256": ("cifar", "naive", 256, []),
    "cifar_naive_b256_bf16_cl": ("cifar", "naive", 256, FAST),
    "cifar_naive_b256_bf16_cl_compile": ("cifar", "naive", 256, [*FAST, "compile=true"]),
    "cifar_replay_b32": ("cifar", "replay", 32, []),
    "cifar_replay_b256_bf16_cl": ("cifar", "replay", 256, FAST),
}


def cifar_like(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """CIFAR-10-shaped .npz files: uint8 (N, 3, 32, 32) images, 10 learnable classes."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(40, 216, size=(10, 3, 32, 32))
    paths = []
    for name, n in (("train", 50_000), ("test", 10_000)):
        y = np.repeat(np.arange(10), n // 10)
        x = patterns[y] + rng.normal(0, 50, size=(n, 3, 32, 32))
        path = folder / f"cifar_like_{name}.npz"
        np.savez(path, x=np.clip(x, 0, 255).astype(np.uint8), y=y)
        paths.append(path)
    return paths[0], paths[1]


def command(name: str, data: dict, epochs: int, run_dir: Path) -> list[str]:
    family, strategy, batch, extra = WORKLOADS[name]
    if family == "mnist":
        bench = ["benchmark=split_mnist"]
        if data.get("mnist"):
            bench = ["benchmark=from_files", f"benchmark.path={data['mnist'][0]}",
                     f"benchmark.test_path={data['mnist'][1]}"]  # fmt: skip
        model = ["model=mlp"]
    else:
        bench = ["benchmark=from_files", f"benchmark.path={data['cifar'][0]}",
                 f"benchmark.test_path={data['cifar'][1]}", "benchmark.augment=true"]  # fmt: skip
        model = ["model=resnet18_reduced"]
    cmd = [sys.executable, "-m", "clrun", *bench, *model, f"strategy={strategy}", "device=cuda",
           f"strategy.epochs={epochs}", f"strategy.batch_size={batch}",
           "strategy.eval_batch_size=1000", "seed=0", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    if strategy == "replay":
        cmd += ["buffer=class_balanced", "buffer.max_size=500"]
    return cmd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated names")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--mnist", nargs=2, metavar=("TRAIN", "TEST"), help=".npz files (x, y)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = ["| workload | samples/s (train) | wall s | train s | peak GPU MB | final acc |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = {"mnist": args.mnist, "cifar": cifar_like(Path(tmp))}
        for name in args.workloads.split(","):
            run_dir = Path(tmp) / name
            t0 = time.perf_counter()
            p = subprocess.run(command(name, data, args.epochs, run_dir), cwd=ROOT, text=True,
                               capture_output=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})  # fmt: skip
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                rows.append(
                    f"| {name} | failed: {p.stderr.strip().splitlines()[-1][:120]} | | | | |"
                )
                continue
            s = json.loads((run_dir / "summary.json").read_text())
            rows.append(f"| {name} | {s['samples_per_s']:,.0f} | {wall:.1f} | {s['train_time_s']:.1f} "
                        f"| {s.get('peak_gpu_mem_mb', 0):,.0f} | {s['final_avg_acc']:.3f} |")  # fmt: skip
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
