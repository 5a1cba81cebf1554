"""Weak-pipeline parity: `SegList` + `weak_augment` against the reference `SemiDataset` on real images.

Both pipelines are driven with the same draws (long side, crop position, flip) through fakes of
their random sources, and their outputs compared pixel for pixel: image after ImageNet
normalisation, label (255 = crop padding, labeled), ignore map (254 padding -> 255, unlabeled).
The fakes also record the range each draw was taken from, so the draw distributions are compared
too. Deliberate difference: the project draws from a per-sample `numpy.random.Generator`, top
before left; the reference from Python's `random`, left before top — same ranges, other streams.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.data.datasets as datasets
from pipeline.data.transforms import normalize, weak_augment
from tests.conftest import SHARED
from tests.reference import reference_modules

FIX = SHARED / "fixtures"
VOC = [
    (f"voc/VOCdevkit/VOC2012/JPEGImages/{i}.jpg", f"voc/SegmentationClassAug_palette/{i}.png")
    for i in ("2007_000042", "2007_000123", "2007_000129", "2008_000051", "2008_000195")
]
CITY = [
    (
        "cityscapes/leftImg8bit/val/frankfurt/frankfurt_000001_029086_leftImg8bit.png",
        "cityscapes_derived/gtFine/val/frankfurt/frankfurt_000001_029086_gtFine_labelTrainIds.png",
    )
]
# (long side, x, y) as fractions of their ranges, and the flip
DRAWS = [(0.0, 0.3, 0.9, True), (0.25, 0.0, 1.0, False), (0.5, 0.7, 0.2, True), (0.999, 0.999, 0.0, False)]
CITY_DRAWS = [(0.0, 0.5, 0.5, True), (0.1, 0.9, 0.1, False)]


def _pick(frac: float, lo: int, hi_excl: int) -> int:
    return lo + min(int(frac * (hi_excl - lo)), hi_excl - lo - 1)


class _RefRandom:
    """Stands in for Python's `random` in the reference: randint is inclusive of its upper end."""

    def __init__(self, fracs: dict[str, float], flip: bool):
        self.order, self.fracs, self.flip, self.ranges = ["long", "x", "y"], fracs, flip, {}
        self.n_random = 0

    def randint(self, a: int, b: int) -> int:
        name = self.order[len(self.ranges)]
        self.ranges[name] = (a, b + 1)
        return _pick(self.fracs[name], a, b + 1)

    def random(self) -> float:
        # first call: the flip (p 0.5); afterwards (strong views, CutMix) always "skip"
        self.n_random += 1
        return (0.0 if self.flip else 0.99) if self.n_random == 1 else 0.99


class _OurRng:
    """Stands in for the per-sample `numpy.random.Generator`: integers excludes its upper end."""

    def __init__(self, fracs: dict[str, float], flip: bool):
        self.order, self.fracs, self.flip, self.ranges = ["long", "y", "x"], fracs, flip, {}

    def integers(self, lo: int, hi: int) -> int:
        name = self.order[len(self.ranges)]
        self.ranges[name] = (lo, hi)
        return _pick(self.fracs[name], lo, hi)

    def random(self) -> float:
        return 0.0 if self.flip else 0.99


@pytest.fixture(scope="module")
def ref_semi():
    with reference_modules("dataset.semi", "dataset.transform") as mods:
        yield mods


def _write_list(tmp_path: Path, pairs: list[tuple[str, str]]) -> Path:
    f = tmp_path / "list.txt"
    f.write_text("".join(f"{a} {b}\n" for a, b in pairs))
    return f


def _cases(pairs, draws, crop):
    return [
        pytest.param(p, d, crop, id=f"{Path(p[0]).stem[:23]}-draw{i}-crop{crop}")
        for p in pairs
        for i, d in enumerate(draws)
    ]


@pytest.mark.parametrize("mode", ["train_l", "train_u"])
@pytest.mark.parametrize("pair,draw,crop", _cases(VOC, DRAWS, 321) + _cases(CITY, CITY_DRAWS, 801))
def test_weak_pipeline_matches_reference(ref_semi, tmp_path, monkeypatch, mode, pair, draw, crop):
    if not (FIX / pair[0]).exists():
        pytest.skip(f"fixture {pair[0]} not available")
    semi, transform = ref_semi
    fracs = dict(zip(("long", "x", "y"), draw[:3], strict=True))
    ref_rand, our_rng = _RefRandom(fracs, draw[3]), _OurRng(fracs, draw[3])
    monkeypatch.setattr(transform, "random", ref_rand)
    monkeypatch.setattr(semi, "random", ref_rand)
    monkeypatch.setattr(
        datasets,
        "weak_augment",
        lambda img, mask, crop, rng, pad_value, scale: weak_augment(
            img,
            mask,
            crop,
            our_rng,
            pad_value=pad_value,
            scale=scale,  # train.scale's default
        ),
    )
    lst = _write_list(tmp_path, [pair])
    ref_item = semi.SemiDataset("x", str(FIX), mode, crop, str(lst))[0]
    ours = datasets.SegList(FIX, lst, mode, crop)[0]
    assert our_rng.ranges == ref_rand.ranges  # same draw ranges (long side, x, y)

    img = normalize(ours["image"][None].float() / 255.0)[0]
    assert torch.equal(img, ref_item[0])
    if mode == "train_l":
        assert torch.equal(ours["mask"], ref_item[1])
    else:
        ref_ignore = ref_item[3]
        assert torch.equal(ours["ignore"], ref_ignore == 255)
        assert set(ref_ignore.unique().tolist()) <= {0, 255}
    # the cases cover padding and the no-padding crop offsets
    assert ref_item[0].shape[-2:] == (crop, crop)


def test_val_items_match_reference(ref_semi, tmp_path):
    """Val: the reference normalises the whole image and re-wraps the mask through numpy."""
    _, transform = ref_semi
    pairs = [p for p in VOC + CITY if (FIX / p[0]).exists()]
    if not pairs:
        pytest.skip("no image fixtures")
    ours = datasets.SegList(FIX, _write_list(tmp_path, pairs), "val")
    for i, (img_rel, mask_rel) in enumerate(pairs):
        img = Image.open(FIX / img_rel).convert("RGB")
        ref_img, ref_mask = transform.normalize(img, Image.fromarray(np.array(Image.open(FIX / mask_rel))))
        item = ours[i]
        assert torch.equal(normalize(item["image"][None].float() / 255.0)[0], ref_img)
        assert torch.equal(item["mask"], ref_mask)
