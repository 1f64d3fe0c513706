"""The frozen-feature cache: each sample's backbone embedding computed once, not once per epoch.

Methods that classify on a frozen (or first-session-adapted) embedding (SimpleCIL, RanPAC,
FeCAM, NCM, APER after its adaptation) need the embeddings of an experience's samples when they
fit their classifier, possibly in several components or hooks. :func:`frozen_features` gives
them: computed in large batches under ``torch.inference_mode`` with the benchmark's preparation
(:meth:`~clrun.components.RunState.model_input`, no augmentation), in eval mode, under bf16
autocast on a GPU when the run's ``precision`` is bf16 (fp32 otherwise, and always on the CPU,
so CPU runs repeat bit for bit), returned as float32 on the run's device, and kept there while
neither the samples nor the backbone change.

When an entry is stale: its key holds

- the samples: the tensors ``x`` and ``e`` themselves (the entry keeps them referenced, so their
  memory cannot be reused by other tensors while it lives) and their version counters;
- the backbone and the parameter-efficient modules attached to it (``model.peft``, which change
  its forward pass): every parameter's and buffer's name, data pointer, shape and version counter. An
  optimiser step, ``load_state_dict`` or any in-place write bumps a version counter; a replaced
  or new parameter (an attached module, a grown layer) changes a pointer or the set of names.
  Writes through ``.data`` bypass version counters: after one, call :meth:`FeatureCache.clear`.

The cache lives in ``state.extras`` (one per run, shared by every component) and is never
checkpointed: after a resume the first request recomputes it, from the same batches in the same
order, hence the same numbers.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from clrun import distributed
from clrun.benchmarks import Experience
from clrun.components import RunState

__all__ = ["FeatureCache", "backbone_key", "frozen_features"]

EXTRAS_KEY = "feature_cache"


def backbone_key(module: nn.Module) -> tuple:
    """A cheap, exact fingerprint of ``module``'s current weights: (name, data pointer, shape,
    version counter) of every parameter and buffer. Equal keys mean unchanged weights, short of
    writes through ``.data``."""
    named = [*module.named_parameters(), *module.named_buffers()]
    return tuple((n, t.data_ptr(), tuple(t.shape), t._version) for n, t in named)


class FeatureCache:
    """Embeddings of raw samples by ``state.model.backbone``, cached per (samples, backbone).

    ``batch_size``: samples per forward pass (no effect on what is cached beyond floating-point
    rounding, and a fixed value keeps that the same in every process). ``entries``: how many
    sets of samples are kept, least recently used dropped first (an experience's training data,
    its test data, the memory: a handful)."""

    def __init__(self, batch_size: int = 512, entries: int = 8):
        self.batch_size = batch_size
        self.entries = entries
        self._cache: OrderedDict[tuple, tuple[Experience, Tensor]] = OrderedDict()
        self.computed = 0  # feature passes made (each over a whole set of samples): for tests

    def __call__(self, state: RunState, samples: Experience) -> Tensor:
        """(N, D) float32 embeddings of ``samples`` on the run's device."""
        backbone = state.model.backbone
        key = (
            id(samples.x),
            id(samples.e),
            samples.x._version,
            samples.e._version,
            self.batch_size,
            backbone_key(backbone),
            backbone_key(getattr(state.model, "peft", nn.Module())),
        )
        hit = self._cache.get(key)
        if hit is not None and hit[0].x is samples.x and hit[0].e is samples.e:
            self._cache.move_to_end(key)
            return hit[1]
        # cloned outside inference mode (also when asked at evaluation, which runs in it): a
        # normal tensor that training code may use later
        with torch.inference_mode(False):
            features = self._compute(state, backbone, samples).clone()
        self._cache[key] = (samples, features)  # samples referenced: their ids stay theirs
        while len(self._cache) > self.entries:
            self._cache.popitem(last=False)
        return features

    @torch.inference_mode()
    def _compute(self, state: RunState, backbone: nn.Module, samples: Experience) -> Tensor:
        self.computed += 1
        if len(samples) == 0:
            return torch.zeros(0, 0, device=state.device)
        model = state.model
        modes = [(m, m.training) for m in model.modules()]  # restored exactly afterwards
        model.eval()  # the backbone and its attached modules (their dropout) in eval mode
        bf16 = state.device.type == "cuda" and state.precision == "bf16"
        context = torch.autocast("cuda", torch.bfloat16) if bf16 else nullcontext()

        def shard(part: range) -> Tensor:  # each process its shard in a distributed run
            out = []
            for i in range(part.start, part.stop, self.batch_size):
                s = slice(i, min(i + self.batch_size, part.stop))
                x = state.model_input(samples.x[s], samples.e[s])
                with context:
                    out.append(backbone(x).flatten(1).float())
            return torch.cat(out).to(state.device)

        try:
            return distributed.cat_sharded(len(samples), shard)
        finally:
            for m, training in modes:
                m.training = training

    def clear(self) -> None:
        self._cache.clear()


def frozen_features(state: RunState, samples: Experience, batch_size: int = 512) -> Tensor:
    """Backbone embeddings of ``samples`` from the run's shared :class:`FeatureCache` (created on
    first use in ``state.extras``; ``batch_size`` applies when it is created)."""
    cache = state.extras.get(EXTRAS_KEY)
    if cache is None:
        # room for every test and validation experience (scored from the cache at each
        # evaluation) besides the training sets of the current experience
        b = state.benchmark
        held = len(b.test_stream) + len(b.validation_stream or ())
        cache = state.extras[EXTRAS_KEY] = FeatureCache(batch_size, entries=8 + held)
    return cache(state, samples)
