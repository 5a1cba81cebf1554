"""CutMix boxes and compositing (dssn-method.md §7.4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sample_boxes(
    n: int,
    size: int,
    p: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n, size, size) bool masks: with prob p a box of area U(0.02, 0.4)*S^2, aspect U(0.3, 1/0.3)."""
    box = torch.zeros(n, size, size, dtype=torch.bool)

    def u(lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    for i in range(n):
        if u() > p:
            continue
        area = u(0.02, 0.4) * size * size
        while True:
            ratio = u(0.3, 1 / 0.3)
            w, h = int(math.sqrt(area / ratio)), int(math.sqrt(area * ratio))
            x, y = int(u() * size), int(u() * size)
            if x + w <= size and y + h <= size:
                break
        box[i, y : y + h, x : x + w] = True
    return box.to(device) if device is not None else box


def paste(dst: Tensor, src: Tensor, box: Tensor) -> Tensor:
    """dst outside the box, src inside; box (N,H,W) broadcasts over a channel axis when present."""
    mask = box.unsqueeze(1) if dst.dim() == 4 else box
    return torch.where(mask, src, dst)
