"""Batched augmentation on the run's device.

Augmentation (``benchmark.augment``): a random crop with zero padding (H/8 pixels: 4 at 32×32)
and a random horizontal flip (not for digits), drawn for the whole batch at once from a
``torch.Generator`` the benchmark owns (seeded with ``benchmark.seed``). Its state is in
``Benchmark.state_dict()``, which a checkpoint must hold for a resumed run to stay bit-identical.
Every benchmark function with an ``augment`` option attaches it (through ``core._finish``);
``Benchmark.prepare`` applies it to training batches only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from clrun.checks import int_at_least, require


class RandomCropFlip:
    """Random crop with zero padding and random horizontal flip for a whole (B, C, H, W) batch:
    one gather on the device, no per-sample Python loop. Offsets and flips are drawn on the CPU
    from the given generator, so results are the same on every device."""

    def __init__(self, padding: int = 4, flip: bool = True):
        self.padding = require("augmentation.padding", padding, int_at_least(0))
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        b, c, h, w = x.shape
        p = self.padding
        offsets = torch.randint(0, 2 * p + 1, (2, b), generator=generator)
        flips = torch.randint(0, 2, (b,), generator=generator).bool() if self.flip else None
        rows = offsets[0, :, None] + torch.arange(h)  # (B, H): padded row of each output row
        cols = offsets[1, :, None] + torch.arange(w)  # (B, W)
        if flips is not None:
            cols = torch.where(flips[:, None], cols.flip(1), cols)
        index = rows[:, :, None] * (w + 2 * p) + cols[:, None, :]  # (B, H, W) into the padded
        index = index.to(x.device, non_blocking=True).view(b, 1, h * w).expand(b, c, h * w)
        padded = F.pad(x, (p, p, p, p)) if p else x
        return padded.flatten(2).gather(2, index).view(b, c, h, w)
