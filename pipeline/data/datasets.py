"""One Dataset class for every dataset: it reads UniMatch-format list files.

A list line is `<image rel. path> <mask rel. path>`, relative to the prepared dataset root,
so VOC, Cityscapes and the embedded synthetic set all go through the same code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pipeline.data.transforms import PAD_UNLABELED, to_mask_tensor, to_uint8_tensor, weak_augment

Mode = Literal["train_l", "train_u", "val"]


def read_pairs(list_file: Path) -> list[tuple[str, str]]:
    pairs = []
    for n, line in enumerate(Path(list_file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{list_file}:{n}: expected '<image> <mask>', got {line!r}")
        pairs.append((parts[0], parts[1]))
    if not pairs:
        raise ValueError(f"{list_file}: the list is empty")
    return pairs


class SegList(Dataset):
    """Samples of one list file. `length` repeats the list (labeled set matched to unlabeled)."""

    def __init__(
        self,
        root: Path,
        list_file: Path,
        mode: Mode,
        crop: int = 0,
        length: int | None = None,
        scale: tuple[float, float] = (0.5, 2.0),
    ):
        self.root, self.mode, self.crop, self.scale = Path(root), mode, crop, scale
        self.pairs = read_pairs(list_file)
        if length is not None and length > len(self.pairs):
            reps = -(-length // len(self.pairs))
            self.pairs = (self.pairs * reps)[:length]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        img_rel, mask_rel = self.pairs[i]
        img = Image.open(self.root / img_rel).convert("RGB")
        mask = Image.open(self.root / mask_rel)
        if self.mode == "val":
            return {"image": to_uint8_tensor(img), "mask": to_mask_tensor(mask), "index": torch.tensor(i)}
        # Per-sample RNG from torch's (per-worker seeded) generator: reproducible and distinct.
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        pad = 255 if self.mode == "train_l" else PAD_UNLABELED
        img, mask = weak_augment(img, mask, self.crop, rng, pad_value=pad, scale=self.scale)
        m = to_mask_tensor(mask)
        if self.mode == "train_l":
            return {"image": to_uint8_tensor(img), "mask": m}
        ignore = m == PAD_UNLABELED
        return {"image": to_uint8_tensor(img), "ignore": ignore, "gt": m.masked_fill(ignore, 255)}
