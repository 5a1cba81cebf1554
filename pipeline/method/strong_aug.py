"""Strong photometric views on the device, each sample with its own random draws.

UniMatch/DSSN (dssn-method.md §4.1, §7.2-7.3): ColorJitter(0.5, 0.5, 0.5, 0.25) with p=0.8,
grayscale p=0.2, Gaussian blur p=0.5 with sigma ~ U(0.1, 2), and on VOC 1-3 extra random
intensity ops. Scalars are drawn from a CPU generator, so nothing waits on the GPU.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _blur(x: Tensor, sigma: float) -> Tensor:
    k = 2 * math.ceil(3 * sigma) + 1
    k = min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)
    return F.gaussian_blur(x, [k, k], [sigma, sigma]) if k >= 3 else x


def _to_u8(x: Tensor) -> Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _intensity_op(x: Tensor, g: torch.Generator) -> Tensor:
    """One of the 11 DSSN-VOC intensity ops (AugSeg lineage); weakening factors in (0.05, 0.95]."""
    op = int(torch.randint(0, 11, (), generator=g))
    v = 0.95 - 0.9 * _u(g)
    if op == 0:
        return x
    if op == 1:
        return F.autocontrast(x)
    if op == 2:
        return F.equalize(_to_u8(x)).float() / 255
    if op == 3:
        return _blur(x, _u(g, 0.1, 2.0))
    if op == 4:
        return F.adjust_contrast(x, v)
    if op == 5:
        return F.adjust_brightness(x, v)
    if op == 6:
        return F.adjust_saturation(x, v)
    if op == 7:
        return F.adjust_sharpness(x, v)
    if op == 8:
        bits = 8 - max(1, math.ceil(4 * _u(g)))
        return F.posterize(_to_u8(x), bits).float() / 255
    if op == 9:
        return F.solarize(x, (256 - max(1, math.ceil(255 * _u(g)))) / 255)
    shift = 0.5 * _u(g) * (1 if _u(g) < 0.5 else -1)  # +-(0.5 U) of the hue circle
    return F.adjust_hue(x, shift)


def strong_augment(x: Tensor, generator: torch.Generator, intensity_ops: bool = False) -> Tensor:
    """A new batch of strong views of `x` (float [0, 1], (N, 3, H, W)); `x` is not modified."""
    out = []
    g = generator
    for img in x:
        img = img.float()
        if _u(g) < 0.8:  # ColorJitter, its four ops in a random order
            for op in torch.randperm(4, generator=g).tolist():
                if op == 0:
                    img = F.adjust_brightness(img, _u(g, 0.5, 1.5))
                elif op == 1:
                    img = F.adjust_contrast(img, _u(g, 0.5, 1.5))
                elif op == 2:
                    img = F.adjust_saturation(img, _u(g, 0.5, 1.5))
                else:
                    img = F.adjust_hue(img, _u(g, -0.25, 0.25))
        if _u(g) < 0.2:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        if _u(g) < 0.5:
            img = _blur(img, _u(g, 0.1, 2.0))
        if intensity_ops:
            for _ in range(int(torch.randint(1, 4, (), generator=g))):
                img = _intensity_op(img, g)
        out.append(img.clamp(0, 1))
    return torch.stack(out)
