"""X-DER's strong augmentation (SimCLR-style random resized crop, flip, colour jitter and
greyscale) as batched tensor operations on the device; public through
:mod:`clrun.strategies.utils`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["strong_augment"]


GRAY = (0.299, 0.587, 0.114)


def strong_augment(x: Tensor, generator: torch.Generator, scale: float = 255.0) -> Tensor:
    """(N, C, H, W) raw pixels in [0, scale] → augmented float pixels, same shape and range.

    The strong augmentation X-DER's future preparation contrasts (SimCLR-style; the pipeline of
    the authors' Mammoth ``strong_aug``), driven by ``generator``: random horizontal flip
    (p = 0.5), random resized crop (scale 0.2-1, aspect ratio 3/4-4/3, back to the input size,
    bilinear), colour jitter with probability 0.8 (brightness, contrast, saturation 0.4, hue 0.1,
    in a random order per image), random grayscale (p = 0.2). Saturation, hue and grayscale
    leave one-channel images unchanged, as torchvision does. Works on raw pixel values (0 to
    ``scale``: 255 for uint8 images); the benchmark's normalisation comes after."""
    n, c, h, w = x.shape
    dev = x.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    x = x.float() / scale
    x = torch.where((rand(n) < 0.5).view(n, 1, 1, 1), x.flip(3), x)
    x = _resized_crop(x, generator)
    jitter = rand(n) < 0.8
    factors = 1 + (rand(n, 3) * 2 - 1) * 0.4  # brightness, contrast, saturation
    hue = (rand(n) * 2 - 1) * 0.1
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1).to(dev)
    for k in range(4):
        for op in range(4):
            chosen = (order[:, k] == op) & jitter
            x = torch.where(chosen.view(n, 1, 1, 1), _jitter(x, op, factors, hue), x)
    if c == 3:
        gray = _gray(x).expand(-1, 3, -1, -1)
        x = torch.where((rand(n) < 0.2).view(n, 1, 1, 1), gray, x)
    return x * scale


def _resized_crop(x: Tensor, generator: torch.Generator, tries: int = 10) -> Tensor:
    """torchvision's RandomResizedCrop: up to ``tries`` draws of area and ratio per image, the
    first that fits wins; otherwise the whole image."""
    n, _, h, w = x.shape
    area = h * w * (0.2 + 0.8 * torch.rand(n, tries, generator=generator))
    log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * torch.rand(
        n, tries, generator=generator
    )
    cw = torch.sqrt(area * log_r.exp()).round()
    ch = torch.sqrt(area / log_r.exp()).round()
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), -1)
    rows = torch.arange(n)
    cw = torch.where(first >= 0, cw[rows, first.clamp(min=0)], float(w))
    ch = torch.where(first >= 0, ch[rows, first.clamp(min=0)], float(h))
    top = torch.floor(torch.rand(n, generator=generator) * (h - ch + 1))
    left = torch.floor(torch.rand(n, generator=generator) * (w - cw + 1))
    # the crop box in grid_sample's [-1, 1] coordinates (align_corners=False)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = cw / w, ch / h
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(1)


def _jitter(x: Tensor, op: int, factors: Tensor, hue: Tensor) -> Tensor:
    n = x.shape[0]
    if op == 0:  # brightness: blend with black
        return (x * factors[:, 0].view(n, 1, 1, 1)).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean gray level
        mean = _gray(x).mean((1, 2, 3), keepdim=True)
        f = factors[:, 1].view(n, 1, 1, 1)
        return (f * x + (1 - f) * mean).clamp(0, 1)
    if x.shape[1] == 1:
        return x
    if op == 2:  # saturation: blend with the grayscale image
        f = factors[:, 2].view(n, 1, 1, 1)
        return (f * x + (1 - f) * _gray(x)).clamp(0, 1)
    return _shift_hue(x, hue)


def _shift_hue(x: Tensor, hue: Tensor) -> Tensor:
    """Rotate the hue of RGB images in [0, 1] by ``hue`` (fractions of a turn)."""
    r, g, b = x.unbind(1)
    mx, _ = x.max(1)
    mn, _ = x.min(1)
    delta = mx - mn
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(
        mx == r, ((g - b) / safe) % 6, torch.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = (h + hue.view(-1, 1, 1)) % 1.0
    s = torch.where(
        mx > 0, delta / torch.where(mx > 0, mx, torch.ones_like(mx)), torch.zeros_like(mx)
    )
    v = mx
    k = lambda m: (m + h * 6) % 6  # noqa: E731
    f = lambda m: v - v * s * torch.clamp(torch.minimum(k(m), 4 - k(m)), 0, 1)  # noqa: E731
    return torch.stack([f(5), f(3), f(1)], 1)
