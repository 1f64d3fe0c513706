"""One run on several processes (GPUs, nodes) with PyTorch's own engine: torchrun or SLURM
start the processes, ``torch.distributed`` connects them, DistributedDataParallel averages the
gradients. ``strategy.batch_size`` stays the *global* minibatch, so a config trains the same
whatever the number of processes.

How the runner stays one loop that works alone and in a group (DESIGN.md, principle 8):

- every process holds the benchmark tensors and draws the same global minibatch order from the
  same seeded generator; the ``replay`` hooks mix the same buffer samples into it (each buffer
  has its own seeded generator), and the benchmark prepares (augments) the whole minibatch;
- :class:`DataParallel` runs the model's forward pass on this process's contiguous slice of
  that global minibatch only (the expensive part) through DDP, gathers the other slices' logits
  (values only) and hands the loss, penalty and ``after_step`` hooks the *global* logits: every
  hook computes exactly what it computes in one process (DER stores the gathered logits of the
  whole minibatch). The gradient reaching this slice's logits is multiplied by the world size,
  so that DDP's average over processes is the gradient of the global loss, whatever the sizes
  of the slices (an uneven last minibatch needs no weighting: the loss is computed over all
  samples at once). Penalties that do not read the logits (EWC's quadratic, DER's buffer
  forward) are computed identically by every process, so their average is themselves;
- DDP has averaged the gradients by the end of ``backward``: ``after_backward`` hooks (GEM,
  A-GEM, SI, clipping) read and change the global gradient, and every process applies the same
  optimiser step, so the parameters stay identical. Backward passes that components make outside
  the training step (GEM's memory gradients, EWC's Fisher) follow no DDP forward and DDP
  ignores them;
- buffers stay bit-identical on every process without sending samples: they are updated from the
  global minibatch (or experience) with their own seeded generators;
- statistics over an experience are computed on shards and combined: :func:`sum_sharded` (sums
  such as EWC's Fisher and MAS's importance: each process sums its shard, then an all-reduce),
  :func:`cat_sharded` (one row per sample, such as the backbone features of iCaRL's herding and
  class means, of ranked buffer selections and of the frozen-feature cache: each process computes
  its shard, then an all-gather). Evaluation shards each test experience and sums the counts;
- the model may grow (new head units in ``adapt``) or freeze parameters: DDP is wrapped again when
  the set of trainable parameters changes; wrapping broadcasts rank 0's parameters, so a grown
  head's fresh units are the same everywhere;
- rank 0 writes every file (:data:`clrun.io`'s writes are no-ops elsewhere), plots and loggers;
  every process loads the checkpoint; a stop signal on any process becomes, through one
  all-reduce per step, a stop of every process after the same step; the processes wait for
  rank 0's checkpoint before they exit.

Tolerance. One process and N processes compute the same sums in a different order (each
process's forward pass on a smaller minibatch, the all-reduce of the gradients, the sharded
statistics): results agree to float rounding, which training may amplify; the accuracy matrix of
the debug runs agrees exactly or to one sample. Processes agree with each other bit for bit.

Resuming with another world size is allowed: the global minibatches, buffers and random
generators are those of any world size, so the run continues as it would have, up to the
rounding above (a warning says so). BatchNorm: ``distributed.sync_batchnorm`` (auto: on for models
with BatchNorm on GPUs) computes the batch statistics over the global minibatch with
``torch.nn.SyncBatchNorm``; torch's SyncBatchNorm does not run on CPUs, so there each process
normalises its slice with its own statistics (rank 0's running statistics are kept).
Dropout masks come from each process's generator and differ from a single process's.

Processes come from torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) or, without torchrun, from SLURM tasks (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST`` and a port derived from the job id):
``hydra/launcher=slurm_ddp`` starts one task per GPU.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from clrun import io as clrun_io
from clrun.errors import ConfigError

log = logging.getLogger("clrun")

BACKENDS = ("auto", "gloo", "nccl")  # distributed.backend
SYNC_BATCHNORM = ("auto", True, False)  # distributed.sync_batchnorm
TRACE_ENV = "CLRUN_DISTRIBUTED_TRACE"  # tests: a folder where each process logs its state hashes


@dataclass(frozen=True)
class World:
    """Where this process stands in the group."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def from_env(env: Mapping[str, str] | None = None) -> World:
    """The process group this process belongs to, from torchrun's variables or, without them,
    from a SLURM job step of several tasks; a lone process otherwise."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:  # torchrun (or a user who set them)
        return World(
            rank=int(env["RANK"]),
            size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
        )
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        job = int(env.get("SLURM_JOB_ID", 0))
        return World(
            rank=int(env["SLURM_PROCID"]),
            size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(nodes),
            # a port of the job's own, so that two jobs sharing a node do not collide
            master_port=int(env.get("MASTER_PORT") or 15000 + job % 20000),
        )
    return World()


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12],cpu3`` → ``gpu07``."""
    head = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    prefix, ranges = head.group(1), head.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


# ------------------------------------------------------------------ the process group


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def init(backend: str = "auto", env: Mapping[str, str] | None = None) -> World:
    """Join the process group the environment describes (once per process); a lone process
    joins nothing. ``auto``: gloo for CPU tensors and NCCL for CUDA tensors where there is a GPU.
    Only rank 0 writes files from then on."""
    world = from_env(env)
    if world.size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", world.master_addr)
        os.environ.setdefault("MASTER_PORT", str(world.master_port))
        if backend == "auto":
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if "nccl" in backend:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend, rank=world.rank, world_size=world.size)
        clrun_io.set_writer(world.rank == 0)
        if world.rank != 0:  # rank 0 speaks and keeps run.log (SLURM tasks: Hydra set it up)
            root = logging.getLogger()
            for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
                root.removeHandler(h)
            root.setLevel(logging.WARNING)
    return world


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def command_line_overrides(argv: list[str]) -> list[str]:
    """Under torchrun, before Hydra starts: join the group and return the extra overrides that
    make every process use rank 0's run directory (``${now:...}`` resolved at rank 0's moment)
    while only rank 0 writes Hydra's files and the log file. A lone process gets none."""
    world = from_env()
    if world.size == 1:
        return []
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("distributed.backend=")]
    init(chosen[-1] if chosen and chosen[-1] in BACKENDS else "auto")
    moment = [datetime.datetime.now()]
    dist.broadcast_object_list(moment, src=0)
    _freeze_now(moment[0])
    if world.rank == 0:
        return []
    return [
        "hydra.output_subdir=null",  # Hydra's files and run.log: rank 0's
        "hydra.job_logging.root.handlers=[console]",
        "hydra.job_logging.root.level=WARNING",  # the console: rank 0 speaks
    ]


def _freeze_now(moment: datetime.datetime) -> None:
    """Hydra's ``${now:...}`` resolver reads ``hydra.core.utils.datetime.now()``: make it return
    rank 0's moment, so that ``outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}`` is one directory."""
    import hydra.core.utils

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return moment

    hydra.core.utils.datetime = Frozen


# ------------------------------------------------------------------ the run's settings


def setup(cfg, device: torch.device) -> torch.device:
    """Join the group (SLURM tasks join here; torchrun processes have joined before Hydra) and
    check ``distributed.*``; returns the device this process trains on (``cuda:LOCAL_RANK``)."""
    backend = _select(cfg, "distributed.backend", "auto")
    if backend not in BACKENDS:
        raise ConfigError(f"distributed.backend={backend!r}: allowed are {', '.join(BACKENDS)}")
    sync = _select(cfg, "distributed.sync_batchnorm", "auto")
    if sync not in SYNC_BATCHNORM:
        raise ConfigError(f"distributed.sync_batchnorm={sync!r}: allowed are auto, true, false")
    world = init(backend)
    if world.size > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    return device


def prepare_model(cfg, model: nn.Module, device: torch.device) -> nn.Module:
    """``distributed.sync_batchnorm``: BatchNorm layers become SyncBatchNorm (auto: on GPUs in a
    group); the state dict keeps its keys."""
    if world_size() == 1 or not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        return model
    sync = _select(cfg, "distributed.sync_batchnorm", "auto")
    if sync is True and device.type != "cuda":
        raise ConfigError(
            "distributed.sync_batchnorm=true: torch's SyncBatchNorm runs on GPUs only; "
            "use auto or false on CPUs"
        )
    if sync is False or device.type != "cuda":
        if sync == "auto":
            log.warning("BatchNorm on CPUs: each process normalises its slice of the minibatch")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _select(cfg, key: str, default):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=default)


# ------------------------------------------------------------------ the training forward pass


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g * ctx.factor, None


class DataParallel:
    """The runner's training forward pass, ``forward(x, t)`` → logits of the whole (global)
    minibatch. Alone: ``state.model(x, t)``. In a group: DDP's forward pass on this process's
    slice, the other slices' logits gathered (see the module docstring)."""

    def __init__(self, state):
        self.state = state
        self.ddp: nn.Module | None = None
        self.wrapped: tuple = ()

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        model = self.state.model
        size = world_size()
        if size == 1:
            return model(x, t)
        part = shard(len(x))
        ddp = self._wrapper(model)
        local = ddp(x[part.start : part.stop], t[part.start : part.stop])
        rows = gather_rows(local.detach(), len(x))
        return torch.cat(
            [rows[: part.start], _ScaleGrad.apply(local, float(size)), rows[part.stop :]]
        )

    def _wrapper(self, model: nn.Module) -> nn.Module:
        """DDP around ``model``, wrapped again after the model grew, was replaced or changed
        which parameters train (DDP's set of parameters is fixed when it wraps)."""
        trainable = tuple(id(p) for p in model.parameters() if p.requires_grad)
        key = (id(model), trainable)
        if key != self.wrapped:
            if not trainable:
                self.ddp = model  # nothing to average
            else:
                ids = [self.state.device.index] if self.state.device.type == "cuda" else None
                self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
            self.wrapped = key
        return self.ddp


# ------------------------------------------------------------------ shards and reductions


def shard(n: int, size: int | None = None, rank_: int | None = None) -> range:
    """This process's contiguous part of ``range(n)``: sizes differ by one at most, the first
    ``n % size`` processes taking one more."""
    size = world_size() if size is None else size
    r = rank() if rank_ is None else rank_
    base, extra = divmod(n, size)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def sum_over_ranks(value):
    """A tensor (or a dict of tensors) summed over the processes, in place; itself when alone."""
    if world_size() == 1:
        return value
    for t in value.values() if isinstance(value, dict) else [value]:
        dist.all_reduce(t)
    return value


def gather_rows(local: Tensor, n: int) -> Tensor:
    """The rows of all processes' shards of ``range(n)`` (this one's is ``local``), in order."""
    size = world_size()
    if size == 1:
        return local
    longest = shard(n, size, 0)
    padded = local.new_zeros((len(longest), *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: len(shard(n, size, r))] for r, p in enumerate(parts)])


def sum_sharded(n: int, compute: Callable[[range], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Σ over ``range(n)`` of a per-sample quantity: ``compute(part)`` sums it over ``part``;
    each process sums its shard and the sums are added up (EWC's Fisher, MAS's importance).
    Fewer items than processes: every process computes them all (no empty shard)."""
    if n < world_size():
        return compute(range(n))
    return sum_over_ranks(compute(shard(n)))


def cat_sharded(n: int, compute: Callable[[range], Tensor]) -> Tensor:
    """One row per sample of ``range(n)``: ``compute(part)`` gives the rows of ``part``; each
    process computes its shard and every process gets all rows (features for herding, class
    means, the frozen-feature cache). Fewer rows than processes: every process computes them
    all."""
    if n < world_size():
        return compute(range(n))
    return gather_rows(compute(shard(n)), n)


def barrier() -> None:
    """Wait for every process (alone: nothing)."""
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: bool) -> bool:
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _collective_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def agree_to_stop(stop) -> bool:
    """Whether every process stops now: a signal on any one of them stops all (one all-reduce;
    alone: whether a signal came). The decision is kept in ``stop`` for its ``hand_over``."""
    if world_size() == 1:
        return stop.requested
    stop.agreed = any_rank(stop.requested)
    if stop.agreed and stop.signum is None:
        stop.signum = signal.SIGTERM  # another process was signalled
    return stop.agreed


def saved(state: dict) -> None:
    """After rank 0 wrote a checkpoint: the others wait for it (a process that exits next must
    not cut the writing short). With ``$CLRUN_DISTRIBUTED_TRACE`` (tests), every process also
    appends the hashes of its model, buffer and components to ``rank<r>.jsonl`` there."""
    folder = os.environ.get(TRACE_ENV)
    if folder:
        record = {
            "rank": rank(),
            "pid": os.getpid(),
            "next_experience": state["next_experience"],
            "step": state["step"],
            "inside": state["position"] is not None,
            **{k: _digest(state[k]) for k in ("model", "buffer", "components")},
        }
        with open(Path(folder) / f"rank{rank()}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    barrier()


def _digest(value) -> str:
    buf = io.BytesIO()
    torch.save(value, buf)
    return hashlib.sha256(buf.getvalue()).hexdigest()[:16]


def check_resume(saved_state: dict) -> None:
    """A checkpoint written by another number of processes: allowed, with a warning."""
    before = saved_state.get("world_size", 1)
    if before != world_size():
        log.warning(
            "resuming a run of %d process(es) with %d: the same global minibatches and buffers, "
            "results equal up to float rounding rather than bit for bit",
            before,
            world_size(),
        )
