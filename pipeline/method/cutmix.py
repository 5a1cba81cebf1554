"""CutMix boxes and compositing (dssn-method.md §7.4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _u(g: torch.Generator | None, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _one_box(size: int, p: float, g: torch.Generator | None) -> tuple[int, int, int, int]:
    """(y, x, h, w) of one box, h = w = 0 for no box; the reference's rejection loop."""
    if _u(g) >= p:  # box with probability p (p = 0: never, p = 1: always)
        return 0, 0, 0, 0
    area = _u(g, 0.02, 0.4) * size * size
    while True:  # area fixed, aspect and position redrawn until the box fits
        ratio = _u(g, 0.3, 1 / 0.3)
        w, h = int(math.sqrt(area / ratio)), int(math.sqrt(area * ratio))
        x = int(torch.randint(0, size, (), generator=g))
        y = int(torch.randint(0, size, (), generator=g))
        if x + w <= size and y + h <= size:
            return y, x, h, w


def sample_boxes(
    n: int,
    size: int,
    p: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(n, size, size) bool masks, each its own draw; deterministic given a CPU `generator`.

    The few scalars are drawn on the CPU; the masks are built on `device` by broadcasting, so only
    an (n, 4) tensor crosses to the accelerator.
    """
    params = torch.tensor([_one_box(size, p, generator) for _ in range(n)], dtype=torch.long)
    params = params.view(n, 4).to(device) if device is not None else params.view(n, 4)
    y, x, h, w = (params[:, i].view(n, 1, 1) for i in range(4))
    idx = torch.arange(size, device=params.device)
    rows = (idx.view(1, size, 1) >= y) & (idx.view(1, size, 1) < y + h)
    cols = (idx.view(1, 1, size) >= x) & (idx.view(1, 1, size) < x + w)
    return rows & cols


def paste(dst: Tensor, src: Tensor, box: Tensor) -> Tensor:
    """A new tensor: dst outside the box, src inside; box (N,H,W) broadcasts over a channel axis."""
    mask = box.bool()
    if dst.dim() == mask.dim() + 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, src, dst)
