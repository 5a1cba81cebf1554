"""Weak (geometric) augmentation, done per sample on the CPU as in the reference loaders.

Photometric strong views and CutMix happen on the device inside the training step
(`pipeline.method.strong_aug`, `pipeline.method.cutmix`), so the loader stays cheap.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

PAD_UNLABELED = 254  # marks crop padding in unlabeled masks (-> ignore map), as the reference does


def weak_augment(
    img: Image.Image, mask: Image.Image, crop: int, rng: np.random.Generator, pad_value: int = 255,
    scale: tuple[float, float] = (0.5, 2.0),
) -> tuple[Image.Image, Image.Image]:
    """Random rescale of the long side, pad to `crop`, random crop, horizontal flip."""
    w, h = img.size
    long_side = max(w, h)
    new_long = int(rng.integers(int(long_side * scale[0]), int(long_side * scale[1]) + 1))
    if w >= h:
        size = (int(h * new_long / w + 0.5), new_long)
    else:
        size = (new_long, int(w * new_long / h + 0.5))
    img = F.resize(img, list(size), interpolation=F.InterpolationMode.BILINEAR)
    mask = F.resize(mask, list(size), interpolation=F.InterpolationMode.NEAREST)
    h, w = size
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    if pad_h or pad_w:
        img = F.pad(img, [0, 0, pad_w, pad_h], fill=0)
        mask = F.pad(mask, [0, 0, pad_w, pad_h], fill=pad_value)
    h, w = h + pad_h, w + pad_w
    top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    img, mask = F.crop(img, top, left, crop, crop), F.crop(mask, top, left, crop, crop)
    if rng.random() < 0.5:
        img, mask = F.hflip(img), F.hflip(mask)
    return img, mask


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()


def to_mask_tensor(mask: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(mask, dtype=np.uint8)).long()


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(x01: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a float [0, 1] batch (N, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)
    return (x01 - mean) / std
