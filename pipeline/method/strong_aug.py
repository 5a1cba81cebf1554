"""Strong photometric views on the device, each sample with its own random draws.

UniMatch/DSSN (dssn-method.md §4.1, §7.2-7.3): ColorJitter(0.5, 0.5, 0.5, 0.25) with p=0.8 (its
four ops in a random order), grayscale p=0.2, Gaussian blur p=0.5 with sigma ~ U(0.1, 2), and on
VOC 1-3 extra random intensity ops. The reference works on PIL uint8 images; here the ops run on
float tensors (no intermediate uint8 rounding, except for the ops defined only on uint8).
Scalars come from a CPU generator, so nothing waits on the GPU.
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as F
from torch import Tensor

N_INTENSITY_OPS = 11


def _u(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur with an odd kernel covering about 3 sigma (PIL's radius = sigma)."""
    k = 2 * math.ceil(3 * sigma) + 1
    k = min(k, 2 * ((min(x.shape[-2:]) - 1) // 2) + 1)  # reflect padding must stay inside the image
    return F.gaussian_blur(x, [k, k], [sigma, sigma]) if k >= 3 else x


def _to_u8(x: Tensor) -> Tensor:
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


def _from_u8(x: Tensor) -> Tensor:
    return x.float() / 255


def _weaken(g: torch.Generator) -> float:
    return 0.95 - 0.9 * _u(g)  # in (0.05, 0.95]: these ops always weaken the image


def _intensity_op(x: Tensor, g: torch.Generator) -> Tensor:
    """One of the 11 DSSN-VOC intensity ops (AugSeg lineage, spec §7.3), own magnitude draw."""
    op = int(torch.randint(0, N_INTENSITY_OPS, (), generator=g))
    if op == 0:  # identity
        return x
    if op == 1:
        return F.autocontrast(x)
    if op == 2:
        return _from_u8(F.equalize(_to_u8(x)))
    if op == 3:
        return _blur(x, _u(g, 0.1, 2.0))
    if op == 4:
        return F.adjust_contrast(x, _weaken(g))
    if op == 5:
        return F.adjust_brightness(x, _weaken(g))
    if op == 6:  # PIL "color" = saturation
        return F.adjust_saturation(x, _weaken(g))
    if op == 7:
        return F.adjust_sharpness(x, _weaken(g))
    if op == 8:  # keep 4..7 bits
        return _from_u8(F.posterize(_to_u8(x), 8 - max(1, math.ceil(4 * _u(g)))))
    if op == 9:  # invert pixels >= threshold, threshold in 1..255 on the uint8 scale
        return _from_u8(F.solarize(_to_u8(x), 256 - max(1, math.ceil(255 * _u(g)))))
    # hue: +-(0.5 U) of the hue circle (uint8 H wrap-around in the reference)
    shift = 0.5 * _u(g)
    return F.adjust_hue(x, shift if _u(g) < 0.5 else -shift)


def _color_jitter(img: Tensor, g: torch.Generator) -> Tensor:
    """torchvision ColorJitter(0.5, 0.5, 0.5, 0.25): factors drawn, then applied in a random order."""
    order = torch.randperm(4, generator=g).tolist()
    b, c, s = _u(g, 0.5, 1.5), _u(g, 0.5, 1.5), _u(g, 0.5, 1.5)
    h = _u(g, -0.25, 0.25)
    for op in order:
        if op == 0:
            img = F.adjust_brightness(img, b)
        elif op == 1:
            img = F.adjust_contrast(img, c)
        elif op == 2:
            img = F.adjust_saturation(img, s)
        else:
            img = F.adjust_hue(img, h)
    return img


def strong_augment(x: Tensor, generator: torch.Generator, intensity_ops: bool = False) -> Tensor:
    """A new batch of strong views of `x` (float [0, 1], (N, 3, H, W)); `x` is not modified.

    Every sample gets its own draws (the reference augments image by image in the loader).
    `generator` must be a CPU generator; the output has x's shape, dtype and device.
    Always computed in fp32: the step runs inside the fast path's bf16 autocast, which would
    otherwise run the blur and sharpness convolutions in bf16 and change the views (mean |diff|
    0.04 on [0, 1] images, tests/method/test_strong_aug.py).
    """
    with torch.autocast(x.device.type, enabled=False):
        return _strong_augment(x, generator, intensity_ops)


def _strong_augment(x: Tensor, generator: torch.Generator, intensity_ops: bool) -> Tensor:
    g = generator
    out = []
    for img in x:
        img = img.float()
        if _u(g) < 0.8:
            img = _color_jitter(img, g)
        if _u(g) < 0.2:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        if _u(g) < 0.5:
            img = _blur(img, _u(g, 0.1, 2.0))
        if intensity_ops:
            for _ in range(int(torch.randint(1, 4, (), generator=g))):
                img = _intensity_op(img, g)
        out.append(img.clamp(0, 1))
    if not out:
        return x.clone()
    return torch.stack(out).to(x.dtype)
