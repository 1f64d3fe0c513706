"""clrun against a bare, hand-written PyTorch loop doing the same work, side by side.

    python scripts/bench.py                              # every workload, 3 interleaved repeats
    python scripts/bench.py --workloads 'mnist_*' --repeats 5 --threads 2
    python scripts/bench.py --workloads 'cifar_*' --device cuda --precision bf16 --channels-last \\
        --cifar-per-class 5000,1000                      # GPU samples/s on a full-size stream
    python scripts/bench.py --workloads cifar_naive_b128 --scaling 2   # 1 → 2 processes (torchrun)

Workloads: Split MNIST, MLP 400-400, Adam (lr 0.001): naive, replay (class-balanced buffer of 500),
LwF and EWC, at batch 32 and 128 (``mnist_<strategy>_b<batch>``); Split CIFAR-10, reduced
ResNet-18, SGD (lr 0.05), random crop + flip augmentation: naive and replay, at batch 32 and 128
(``cifar_<strategy>_b<batch>``); the same CIFAR-shaped data through a ViT-Tiny (timm's
``vit_tiny_patch16_224`` with 4 blocks, 32×32 inputs in 4×4 patches, its own normalisation, a
linear head, random initialisation): fine-tuning at batch 32 (``vit_naive_b32``, SGD lr 0.01) and
SimpleCIL's prototype classifier on the frozen embedding (``vit_simplecil``: no gradient step; one
feature pass over each experience's training data, the test embeddings computed once). Every run
is 5 experiences of one epoch each.

CIFAR-10 here is generated, CIFAR-shaped data written in the official python format (a
``cifar-10-batches-py`` folder: ``--cifar-per-class`` training and test images per class, default
200,20 so that a CPU run takes ~10-30 s); clrun reads it as ``benchmark=split_cifar10
benchmark.path=<folder>`` (the real loader: unpickling, checks, the per-channel CIFAR-10
normalisation) and the bare loop reads the same files. Timing does not depend on the pixels.

For every workload the script runs, as separate processes and interleaved (A B A B ...):
``python -m clrun ... plots.format=[]`` (the real CLI: Hydra, config checks, metrics files, a
checkpoint after every experience; no plots, as the bare loop draws none) and
``python scripts/bench.py --bare ...`` (the reference loop below). It reports the median
whole-process wall time and training time of each and their ratio clrun/bare, clrun's
samples/s, the peak RSS of both, their final average accuracy and the largest difference
between their accuracies on any test experience at any point, the untrained model included
(``max ΔR``: 0 when both did the same arithmetic, as on every workload here; with EWC clrun
rounds differently, see below, and still gave 0).

What "the same work" means. The bare loop is what a researcher would write by hand to get the
numbers clrun reports, with nothing else: the same data tensors (uint8, normalised per batch on
the device), the same model and initialisation (seed 0), the same minibatch order (a seeded
``torch.Generator``), the same augmentation draws, the same optimiser, the same replay memory
(class-balanced, random selection, uniform draws from its own seeded generator), and the same
evaluation: accuracy and loss on every test experience after every experience, and once before
training, because clrun reports forward transfer (FWT), whose definition needs the accuracy of
the untrained model. EWC's Fisher is computed in the same closed form as clrun's for an MLP
(per-sample gradients of a linear layer are outer products), over the same seeded sample order;
its penalty is written as a researcher writes it, one term per experience, while clrun's separate
EWC penalises with the merged form (one quadratic with the same value and gradients, up to
rounding), so clrun's EWC training is faster than the bare loop's from the third experience on.
What the bare loop does not do is clrun's bookkeeping: Hydra's config composition and run
directory, config validation, metrics files after every evaluation, a checksummed checkpoint
after every experience and the summary. That is the overhead the ratio measures. The training
phase of both is timed the same way (training plus the strategy's end-of-experience work: buffer
update, teacher copy, Fisher), ending with a host sync.

The plots are the one part of a default clrun run left out of the comparison (a bare loop draws
nothing); they are reported on a line of their own below the table: the seconds
``clrun.plots.plot_run`` takes with the default ``plots.format=[png]`` (importing matplotlib,
drawing and writing ``acc_matrix.png`` and ``acc_curve.png``) for the accuracy matrix of the
first workload's clrun run, timed with ``time.perf_counter`` around that one call in a fresh
process that has first imported what a run's process holds when it plots (torch and the runner),
median of ``--repeats`` such processes. A default run takes the row's clrun time plus that.

``--device cuda``, ``--precision bf16``, ``--compile``, ``--channels-last`` and ``--deterministic``
apply to both sides (clrun: ``device=``, ``precision=``, ``compile=``, ``channels_last=``,
``deterministic=``). On a GPU, without ``--deterministic``, cuDNN's and the scatter kernels'
summation order varies from run to run, so ``max ΔR`` is then not 0 even between two clrun runs.
``--clrun-arg KEY=VALUE`` (repeatable) passes any other override to clrun only (the last value
of a key wins): the bare loop does not follow it, so the ratio then compares different work
(``--clrun-arg 'plots.format=[png]'`` puts the plots back into clrun's times).

This is a benchmark, not a test: run it on a quiet machine. Output: a Markdown table on stdout
(and ``--out FILE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPLAY_SIZE = 500  # class-balanced memory, random selection
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class Workload:
    data: str  # mnist | cifar
    strategy: str  # naive | replay | lwf | ewc
    batch: int


WORKLOADS: dict[str, Workload] = {
    **{
        f"mnist_{s}_b{b}": Workload("mnist", s, b)
        for s in ("naive", "replay", "lwf", "ewc")
        for b in (32, 128)
    },
    **{f"cifar_{s}_b{b}": Workload("cifar", s, b) for s in ("naive", "replay") for b in (32, 128)},
    # a ViT-Tiny (4 blocks, 32×32 inputs in 4×4 patches) on the CIFAR-shaped data: fine-tuning,
    # and SimpleCIL's prototype classifier on the frozen (here randomly initialised) embedding
    "vit_naive_b32": Workload("vit", "naive", 32),
    "vit_simplecil": Workload("vit", "simplecil", 512),
}
VIT = {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 4}


@dataclass(frozen=True)
class Settings:
    """What applies to both sides of every workload."""

    threads: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    deterministic: bool = False
    cifar_folder: str = ""  # the generated cifar-10-batches-py


def clrun_command(w: Workload, s: Settings, run_dir: str, extra: list[str]) -> list[str]:
    if w.data == "mnist":
        data = ["benchmark=split_mnist", "model=mlp", "optimizer=adam", "optimizer.lr=0.001"]
    else:
        data = [
            "benchmark=split_cifar10",
            f"benchmark.path={s.cifar_folder}",
            "model=resnet18_reduced",
            "optimizer=sgd",
            "optimizer.lr=0.05",
        ]
    if w.data == "vit":
        data[2:] = [
            "model=timm",
            f"model.name={VIT['name']}",
            f"model.img_size={VIT['img_size']}",
            f"model.patch_size={VIT['patch_size']}",
            f"+model.create_args.depth={VIT['depth']}",
            "model.head=single",
            "optimizer=sgd",
            "optimizer.lr=0.01",
        ]
    cmd = [
        sys.executable,
        "-m",
        "clrun",
        *data,
        f"strategy={w.strategy}",
        "strategy.epochs=1",
        f"strategy.batch_size={w.batch}",
        "strategy.eval_batch_size=1000",
        f"threads={s.threads}",
        f"device={s.device}",
        f"precision={s.precision}",
        f"compile={str(s.compile).lower()}",
        f"channels_last={str(s.channels_last).lower()}",
        f"deterministic={str(s.deterministic).lower()}",
        "seed=0",
        f"hydra.run.dir={run_dir}",
    ]
    if w.strategy == "replay":
        cmd += ["buffer=class_balanced", f"buffer.max_size={REPLAY_SIZE}"]
    return cmd + ["plots.format=[]"] + extra  # the same work as the bare loop: no plots


def bare_command(name: str, s: Settings, result: Path) -> list[str]:
    cmd = [
        sys.executable,
        __file__,
        "--bare",
        name,
        "--result",
        str(result),
        "--threads",
        str(s.threads),
        "--device",
        s.device,
        "--precision",
        s.precision,
        "--cifar-folder",
        s.cifar_folder,
    ]
    return (
        cmd
        + ["--compile"] * s.compile
        + ["--channels-last"] * s.channels_last
        + ["--deterministic"] * s.deterministic
    )


def run_once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return wall


def clrun_result(run_dir: Path, wall: float) -> dict:
    r = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    R = [[m["acc"] for m in records if m["trained_through"] == i] for i in range(-1, 5)]
    return {
        "wall_s": wall,
        "train_s": r["train_time_s"],
        "acc": r["final_avg_acc"],
        "samples_per_s": r["samples_per_s"],
        "peak_rss_mb": r["peak_rss_mb"],
        "peak_gpu_mb": r.get("peak_gpu_mem_mb", 0.0),
        "R": R,
    }


def benchmark(names: list[str], repeats: int, s: Settings, extra: list[str]) -> list[dict]:
    """One row per workload; each row also keeps one clrun run's accuracy matrix (``R``)."""
    rows = []
    for name in names:
        runs: dict[str, list[dict]] = {"clrun": [], "bare": []}
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as tmp:
                run_dir = Path(tmp) / "run"
                wall = run_once(clrun_command(WORKLOADS[name], s, str(run_dir), extra))
                runs["clrun"].append(clrun_result(run_dir, wall))
                out = Path(tmp) / "bare.json"
                wall = run_once(bare_command(name, s, out))
                runs["bare"].append({**json.loads(out.read_text()), "wall_s": wall})
        med = {
            side: {m: statistics.median(r[m] for r in v) for m in v[0] if m != "R"}
            for side, v in runs.items()
        }
        diff = max(
            abs(a - b)
            for c, r in zip(runs["clrun"], runs["bare"], strict=True)
            for row_c, row_b in zip(c["R"], r["R"], strict=True)
            for a, b in zip(row_c, row_b, strict=True)
        )
        rows.append(
            {
                "workload": name,
                "max_acc_diff": diff,
                "R": runs["clrun"][0]["R"][1:],
                **{f"{k}_{m}": v for k, d in med.items() for m, v in d.items()},
            }
        )
        print(
            f"{name}: clrun {med['clrun']['wall_s']:.2f}s / bare {med['bare']['wall_s']:.2f}s",
            file=sys.stderr,
        )
    return rows


def table(rows: list[dict], s: Settings, repeats: int, extra: list[str]) -> str:
    options = f"device {s.device}, {s.threads} thread(s), {s.precision}" + (
        ", compile" * s.compile
        + ", channels-last" * s.channels_last
        + ", deterministic" * s.deterministic
    )
    lines = [
        f"{options}; 1 epoch per experience; median of {repeats} interleaved runs."
        + (f" clrun only: {' '.join(extra)}." if extra else ""),
        "",
        "| workload | whole process clrun / bare (s) | ratio | training clrun / bare (s) | ratio "
        "| samples/s clrun | peak RSS clrun / bare (MB) | final acc clrun / bare | max ΔR |"
        + (" peak GPU memory clrun / bare (MB) |" if s.device == "cuda" else ""),
        "| --- " * (10 if s.device == "cuda" else 9) + "|",
    ]
    for r in rows:
        gpu = f" {r['clrun_peak_gpu_mb']:.0f} / {r['bare_peak_gpu_mb']:.0f} |"
        lines.append(
            f"| {r['workload']} | {r['clrun_wall_s']:.2f} / {r['bare_wall_s']:.2f} "
            f"| {r['clrun_wall_s'] / r['bare_wall_s']:.3f} "
            f"| {r['clrun_train_s']:.2f} / {r['bare_train_s']:.2f} "
            f"| {r['clrun_train_s'] / r['bare_train_s']:.3f} | {r['clrun_samples_per_s']:.0f} "
            f"| {r['clrun_peak_rss_mb']:.0f} / {r['bare_peak_rss_mb']:.0f} "
            f"| {r['clrun_acc']:.4f} / {r['bare_acc']:.4f} | {r['max_acc_diff']:.1g} |"
            + (gpu if s.device == "cuda" else "")
        )
    return "\n".join(lines)


def scaling(names: list[str], n: int, repeats: int, s: Settings, extra: list[str]) -> str:
    """The scaling rows (``--scaling N``): clrun alone against ``torchrun --nproc_per_node=N``
    (one run data-parallel over N processes, the same global minibatch), interleaved. Training
    samples/s is the run's global throughput (``summary.json``); ``max ΔR`` compares the two
    accuracy matrices (float rounding differs, see clrun/distributed.py)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    lines = [
        f"Scaling, device {s.device}, {s.threads} thread(s) per process; 1 epoch per experience; "
        f"median of {repeats} interleaved runs.",
        "",
        f"| workload | training samples/s, 1 process | {n} processes | speedup "
        f"| whole process 1 / {n} (s) | max ΔR |",
        "| --- " * 6 + "|",
    ]
    for name in names:
        runs: dict[int, list[dict]] = {1: [], n: []}
        for _ in range(repeats):
            for procs in runs:
                with tempfile.TemporaryDirectory() as tmp:
                    run_dir = Path(tmp) / "run"
                    cmd = clrun_command(WORKLOADS[name], s, str(run_dir), extra)
                    if procs > 1:  # cmd[1:] is "-m clrun ..."
                        cmd = [*torchrun, f"--nproc_per_node={procs}", *cmd[1:]]
                    runs[procs].append(clrun_result(run_dir, run_once(cmd)))
        med = {
            k: {m: statistics.median(r[m] for r in v) for m in v[0] if m != "R"}
            for k, v in runs.items()
        }
        diff = max(
            abs(a - b)
            for x, y in zip(runs[1], runs[n], strict=True)
            for row_x, row_y in zip(x["R"], y["R"], strict=True)
            for a, b in zip(row_x, row_y, strict=True)
        )
        one, many = med[1], med[n]
        lines.append(
            f"| {name} | {one['samples_per_s']:.0f} | {many['samples_per_s']:.0f} "
            f"| {many['samples_per_s'] / one['samples_per_s']:.2f} "
            f"| {one['wall_s']:.2f} / {many['wall_s']:.2f} | {diff:.1g} |"
        )
        print(
            f"{name}: 1 → {n} processes ×{many['samples_per_s'] / one['samples_per_s']:.2f}",
            file=sys.stderr,
        )
    return "\n".join(lines)


def plot_cost(R: list[list[float]], repeats: int) -> float:
    """The median seconds of a default run's plots (see the module docstring): ``repeats``
    fresh processes, each timing ``clrun.plots.plot_run`` on ``R`` once."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "R.json").write_text(json.dumps(R))
        for _ in range(repeats):
            run_once([sys.executable, __file__, "--plot-cost", tmp])
            times.append(json.loads((Path(tmp) / "plot_cost.json").read_text())["plot_s"])
    return statistics.median(times)


def time_plots(folder: Path) -> None:
    """In this fresh process: import what a run's process holds when it plots, then time the
    plots of ``folder/R.json`` with the default ``plots.format=[png]``."""
    import clrun.run  # noqa: F401 - torch and the runner, as in a run's process
    from clrun import plots

    R = json.loads((folder / "R.json").read_text())
    t0 = time.perf_counter()
    plots.plot_run(folder, R, "naive on split_mnist (mlp), seed 0", ["png"])
    (folder / "plot_cost.json").write_text(json.dumps({"plot_s": time.perf_counter() - t0}))


def write_cifar_folder(folder: Path, train_per_class: int, test_per_class: int) -> None:
    """CIFAR-shaped data in the official python format: each class a random prototype image plus
    noise, in 5 training batches and a test batch of pickled ``{data, labels}``."""
    import numpy as np

    rng = np.random.default_rng(0)
    protos = rng.integers(0, 256, (10, 3 * 32 * 32)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    train = rng.permutation(np.repeat(np.arange(10), train_per_class))
    test = rng.permutation(np.repeat(np.arange(10), test_per_class))
    files = {f"data_batch_{i}": part for i, part in enumerate(np.array_split(train, 5), 1)}
    for name, y in {**files, "test_batch": test}.items():  # one file at a time: bounded memory
        x = protos[y] + rng.normal(0, 60, (len(y), 3 * 32 * 32)).astype(np.float32)
        batch = {"data": np.clip(np.rint(x), 0, 255).astype(np.uint8), "labels": y.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))


# --------------------------------------------------------------------------- the bare loop


def bare(name: str, s: Settings, result: Path) -> None:
    """Class-incremental Split MNIST / Split CIFAR-10 in 5 experiences, written out by hand."""
    import copy

    import numpy as np
    import torch
    import torch.nn.functional as F
    from torch import nn

    w = WORKLOADS[name]
    device = torch.device(s.device)
    torch.set_num_threads(s.threads)
    if s.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(0)
    if w.data == "vit":  # built first, as clrun builds the model right after the data
        import timm

        net = timm.create_model(
            VIT["name"],
            num_classes=0,
            drop_path_rate=0.0,
            img_size=VIT["img_size"],
            patch_size=VIT["patch_size"],
            depth=VIT["depth"],
        )
    if w.data == "mnist":
        cache = Path(os.environ.get("CLRUN_DATA", Path.home() / ".cache" / "clrun"))
        with np.load(cache / "mnist" / "arrays.npz") as z:
            data = {k: torch.from_numpy(z[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
        data = {k: v.unsqueeze(1) if k[0] == "x" else v.long() for k, v in data.items()}
        shift, scale = 255.0 * MNIST_MEAN, 1.0 / (255.0 * MNIST_STD)
    else:
        data = {}
        for split, files in (
            ("train", [f"data_batch_{i}" for i in range(1, 6)]),
            ("test", ["test_batch"]),
        ):
            batches = [pickle.loads((Path(s.cifar_folder) / f).read_bytes()) for f in files]
            data[f"x_{split}"] = torch.from_numpy(
                np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
            )
            data[f"y_{split}"] = torch.tensor([c for b in batches for c in b["labels"]])
        shift = torch.tensor([255.0 * m for m in CIFAR10_MEAN]).view(3, 1, 1).to(device)
        scale = torch.tensor([1.0 / (255.0 * v) for v in CIFAR10_STD]).view(3, 1, 1).to(device)
    if w.data == "vit":  # the ViT's own normalisation (its pretrained config), in float32
        mean = torch.tensor(net.pretrained_cfg["mean"], dtype=torch.float32, device=device)
        std = torch.tensor(net.pretrained_cfg["std"], dtype=torch.float32, device=device)
        shift, scale = (255.0 * mean).view(3, 1, 1), (1.0 / (255.0 * std)).view(3, 1, 1)

    def split(x, y):
        return [(x[(y // 2) == i].to(device), y[(y // 2) == i].to(device)) for i in range(5)]

    train, test = split(data["x_train"], data["y_train"]), split(data["x_test"], data["y_test"])

    def prep(x):
        x = x.float().sub_(shift).mul_(scale)
        return x.contiguous(memory_format=torch.channels_last) if s.channels_last else x

    aug_gen = torch.Generator().manual_seed(0)

    def augment(x):  # a random 32×32 crop of the 4-pixel zero-padded image, a random flip
        b = len(x)
        off = torch.randint(0, 9, (2, b), generator=aug_gen)
        flip = torch.randint(0, 2, (b,), generator=aug_gen).bool()
        rows = off[0, :, None] + torch.arange(32)
        cols = off[1, :, None] + torch.arange(32)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        rows, cols = rows.to(device), cols.to(device)
        padded = F.pad(x, (4, 4, 4, 4))
        batch_idx = torch.arange(b, device=device)[:, None, None]
        crops = padded[batch_idx, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return crops.permute(0, 3, 1, 2).contiguous()

    if w.data == "mnist":
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 400),
            nn.ReLU(),
            nn.Linear(400, 400),
            nn.ReLU(),
            nn.Linear(400, 10),
        )
        opt = torch.optim.Adam(model.parameters(), lr=0.001)
    elif w.data == "vit":

        class ViT(nn.Module):  # the embedding, then a linear head
            def __init__(self):
                super().__init__()
                self.backbone, self.head = net, nn.Linear(net.num_features, 10)

            def forward(self, x):
                return self.head(self.backbone(x))

        model = ViT()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
    else:
        model = _reduced_resnet18()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.to(device)
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    if s.compile:
        model.compile()

    def autocast():
        return torch.autocast(device.type, torch.bfloat16, enabled=s.precision == "bf16")

    @torch.inference_mode()
    def evaluate():  # accuracy and mean loss per test experience (summed on the device)
        model.eval()
        sums = []
        for xt, yt in test:
            correct = torch.zeros((), device=device)
            loss = torch.zeros((), device=device)
            for i in range(0, len(yt), 1000):
                with autocast():
                    out = model(prep(xt[i : i + 1000]))
                correct += (out.argmax(1) == yt[i : i + 1000]).sum()
                loss += F.cross_entropy(out.float(), yt[i : i + 1000], reduction="sum")
            sums.append(torch.stack([correct, loss]))
        model.train()
        return [
            c / len(yt) for (c, _), (_, yt) in zip(torch.stack(sums).tolist(), test, strict=True)
        ]

    baseline = evaluate()  # the untrained model: FWT's b_j
    if w.strategy == "simplecil":
        return _bare_simplecil(model, train, test, prep, baseline, result)
    gen = torch.Generator().manual_seed(0)  # minibatch order
    mem_gen = torch.Generator().manual_seed(0)  # the replay memory's own draws
    ewc_gen = torch.Generator().manual_seed(0)  # the order of the Fisher's samples
    mem_x = mem_y = None
    classes_seen: list[int] = []  # in order of arrival: the memory's groups
    teacher, old_classes = None, []
    fisher, anchor = [], []
    R, train_s, samples = [], 0.0, 0
    for x, y in train:
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(len(y), generator=gen).to(device)
        losses = []
        for i in range(0, len(y), w.batch):
            idx = order[i : i + w.batch]
            xb, yb = x[idx], y[idx]
            if w.strategy == "replay" and mem_y is not None:
                m = torch.randperm(len(mem_y), generator=mem_gen)[: len(idx)].to(device)
                xb, yb = torch.cat([xb, mem_x[m]]), torch.cat([yb, mem_y[m]])
            inp = prep(augment(xb) if w.data != "mnist" else xb)
            with autocast():
                out = model(inp)
                loss = F.cross_entropy(out, yb)
                if w.strategy == "lwf" and teacher is not None:
                    with torch.no_grad():
                        old = teacher(inp)[:, old_classes]
                    kl = F.kl_div(
                        F.log_softmax(out[:, old_classes] / 2, 1),
                        F.log_softmax(old / 2, 1),
                        log_target=True,
                        reduction="sum",
                    )
                    loss = loss + kl / len(inp)
                if w.strategy == "ewc" and fisher:  # λ/2 Σ_experiences Σ F (θ - θ*)²
                    total = sum(
                        sum(
                            (fi * (p - ai).pow(2)).sum()
                            for fi, p, ai in zip(f, model.parameters(), a, strict=True)
                        )
                        for f, a in zip(fisher, anchor, strict=True)
                    )
                    loss = loss + 0.5 * 5000 * total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            samples += len(yb)
        if w.strategy == "replay":  # equal share per class, kept at random
            classes_seen += [c for c in y.unique().tolist() if c not in classes_seen]
            xs = torch.cat([mem_x, x]) if mem_y is not None else x
            ys = torch.cat([mem_y, y]) if mem_y is not None else y
            base, extra = divmod(REPLAY_SIZE, len(classes_seen))
            keep = torch.zeros(len(ys), dtype=torch.bool)
            ys_cpu = ys.cpu()
            for k, c in enumerate(classes_seen):
                members = torch.nonzero(ys_cpu == c).squeeze(1)
                quota = base + (k < extra)
                if len(members) > quota:
                    members = members[torch.randperm(len(members), generator=mem_gen)[:quota]]
                keep[members] = True
            keep = keep.to(device)
            mem_x, mem_y = xs[keep], ys[keep]
        if w.strategy == "lwf":
            teacher = copy.deepcopy(model).eval()
            old_classes = sorted(set(old_classes) | set(y.unique().tolist()))
        if w.strategy == "ewc":  # diagonal Fisher, Σ_i (∂ℓ_i/∂θ)² / n, in closed form for an
            # MLP: a Linear's per-sample weight gradient is δ_i a_iᵀ, so Σ_i its square is
            # (δ²)ᵀ(a²): one backward per 4096 samples (in a seeded random order, as clrun)
            model.eval()
            f = [torch.zeros_like(p) for p in model.parameters()]
            perm = torch.randperm(len(y), generator=ewc_gen).to(device)
            linears = [m for m in model if isinstance(m, nn.Linear)]
            for i in range(0, len(y), 4096):
                h, acts, outs = prep(x[perm[i : i + 4096]]).flatten(1), [], []
                for k, linear in enumerate(linears):
                    acts.append(h.detach())
                    z = linear(h)
                    z.retain_grad()
                    outs.append(z)
                    h = torch.relu(z) if k < len(linears) - 1 else z
                F.cross_entropy(h, y[perm[i : i + 4096]], reduction="none").sum().backward()
                for k, (a, z) in enumerate(zip(acts, outs, strict=True)):
                    f[2 * k] += z.grad.square().T @ a.square()
                    f[2 * k + 1] += z.grad.square().sum(0)
            fisher.append([fi / len(y) for fi in f])
            anchor.append([p.detach().clone() for p in model.parameters()])
        if not torch.isfinite(torch.stack(losses)).all():  # one host sync, as clrun does
            raise FloatingPointError(f"non-finite loss in experience {len(R)}")
        train_s += time.perf_counter() - t0
        R.append(evaluate())
    _write_bare_result(result, R, baseline, train_s, samples, device)


def _write_bare_result(result: Path, R, baseline, train_s: float, samples: int, device) -> None:
    """The bare loop's numbers, in the fields the clrun side's summary gives."""
    import torch

    peak_gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    result.write_text(
        json.dumps(
            {
                "train_s": train_s,
                "acc": sum(R[-1]) / len(R[-1]),
                "R": [baseline, *R],
                "samples_per_s": samples / train_s,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_gpu_mb": peak_gpu,
            }
        )
    )


def _bare_simplecil(model, train, test, prep, baseline, result: Path) -> None:
    """SimpleCIL by hand: class means of the frozen embedding (batches of 512, eval mode, no
    augmentation) after each experience; test samples scored by cosine similarity to every seen
    class's mean, their embeddings computed once (the backbone never changes)."""
    import torch
    import torch.nn.functional as F

    model.eval()

    @torch.inference_mode()
    def embed(x):
        return torch.cat(
            [model.backbone(prep(x[i : i + 512])).float() for i in range(0, len(x), 512)]
        )

    sums = counts = None
    test_f = None
    R, train_s, samples = [], 0.0, 0
    for x, y in train:
        t0 = time.perf_counter()
        f = embed(x).double()
        if sums is None:
            sums = torch.zeros(10, f.shape[1], dtype=torch.float64, device=f.device)
            counts = torch.zeros(10, dtype=torch.long, device=f.device)
        sums.index_add_(0, y, f)
        counts += torch.bincount(y, minlength=10)
        train_s += time.perf_counter() - t0
        samples += len(y)
        if test_f is None:
            test_f = [embed(xt) for xt, _ in test]
        protos = F.normalize((sums / counts.clamp(min=1).unsqueeze(1)).float(), dim=1)
        row = []
        for f_t, (_, yt) in zip(test_f, test, strict=True):
            scores = (F.normalize(f_t, dim=1) @ protos.T).masked_fill(~(counts > 0), -1e9)
            row.append((scores.argmax(1) == yt).float().mean().item())
        R.append(row)
    _write_bare_result(result, R, baseline, train_s, samples, sums.device)


def _reduced_resnet18(nf: int = 20, n_classes: int = 10):
    """The reduced ResNet-18 of GEM, by hand: 3×3 stem, basic blocks [2, 2, 2, 2] of nf, 2nf,
    4nf, 8nf channels, global average pooling, a linear classifier."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
                )

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, nf, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(nf)
            layers, c_in = [], nf
            for i, width in enumerate((nf, 2 * nf, 4 * nf, 8 * nf)):
                for j in range(2):
                    layers.append(Block(c_in, width, 2 if i > 0 and j == 0 else 1))
                    c_in = width
            self.blocks = nn.Sequential(*layers)
            self.linear = nn.Linear(c_in, n_classes)

        def forward(self, x):
            out = self.blocks(torch.relu(self.bn1(self.conv1(x))))
            return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))

    return Net()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--workloads",
        default="*",
        help=f"comma-separated names or patterns (default: all): {', '.join(WORKLOADS)}",
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads on both sides")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (both)")
    ap.add_argument("--channels-last", action="store_true", help="channels-last (both)")
    ap.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic GPU kernels (both): max ΔR 0 on a GPU too",
    )
    ap.add_argument(
        "--clrun-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another clrun override (clrun only; repeatable)",
    )
    ap.add_argument(
        "--cifar-per-class",
        default="200,20",
        metavar="TRAIN,TEST",
        help="generated CIFAR-10 images per class (default 200,20; real: 5000,1000)",
    )
    ap.add_argument(
        "--scaling",
        type=int,
        metavar="N",
        help="instead: training throughput of 1 process against N (torchrun, data-parallel)",
    )
    ap.add_argument("--out", type=Path, help="also write the table to this file")
    ap.add_argument("--bare", metavar="WORKLOAD", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cifar-folder", default="", help=argparse.SUPPRESS)
    ap.add_argument("--plot-cost", type=Path, metavar="FOLDER", help=argparse.SUPPRESS)
    a = ap.parse_args()
    settings = Settings(
        a.threads,
        a.device,
        a.precision,
        a.compile,
        a.channels_last,
        a.deterministic,
        a.cifar_folder,
    )
    if a.bare:
        bare(a.bare, settings, a.result)
        return
    if a.plot_cost:
        time_plots(a.plot_cost)
        return
    names = [n for p in a.workloads.split(",") for n in WORKLOADS if fnmatch.fnmatch(n, p)]
    names = list(dict.fromkeys(names))
    if not names:
        ap.error(f"no workload matches {a.workloads!r}; known: {', '.join(WORKLOADS)}")
    train_pc, test_pc = (int(v) for v in a.cifar_per_class.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        if any(WORKLOADS[n].data != "mnist" for n in names):
            folder = Path(tmp) / "cifar-10-batches-py"
            write_cifar_folder(folder, train_pc, test_pc)
            settings = dataclasses.replace(settings, cifar_folder=str(folder))
        if a.scaling:
            md = scaling(names, a.scaling, a.repeats, settings, a.clrun_arg)
            print(md)
            if a.out:
                a.out.write_text(md + "\n")
            return
        rows = benchmark(names, a.repeats, settings, a.clrun_arg)
        plot_s = plot_cost(rows[0]["R"], a.repeats)
    md = table(rows, settings, a.repeats, a.clrun_arg)
    md += (
        f"\n\nPlots, left out above (clrun ran with plots.format=[], the bare loop draws none): "
        f"the default plots.format=[png] adds {plot_s:.2f} s to a run (importing matplotlib, "
        f"drawing and writing acc_matrix.png and acc_curve.png; median of {a.repeats} fresh "
        "processes)."
    )
    if any(WORKLOADS[n].data != "mnist" for n in names):
        md += f"\n\nCIFAR-10: generated, {train_pc} training and {test_pc} test images per class."
    print(md)
    if a.out:
        a.out.write_text(md + "\n")


if __name__ == "__main__":
    main()
