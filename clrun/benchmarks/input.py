"""What input a model takes (:class:`InputSpec`), as a pre-trained backbone reports it; the
benchmark makes its batches fit it (:meth:`clrun.benchmarks.Benchmark.fit_input`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InputSpec:
    """The input a model takes, reported by the model (``model.input_spec``; pre-trained
    backbones): ``channels`` and ``size`` (H, W) of an image, and the mean/std per channel of
    its weights' normalisation, on the [0, 1] scale. :meth:`Benchmark.fit_input` makes the
    benchmark's batches fit it, on the device."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
