"""Evaluation parity: `pipeline.evaluate` against the reference `supervised.py: evaluate`.

Same model, same images, both modes: 'sliding_window' (Cityscapes; window = crop, stride
int(crop * 2/3), border windows truncated, softmax summed) and 'original' (whole image). Compared:
each image's prediction map (the reference's, taken where it enters `intersectionAndUnion`) and the
set-level per-class IoU / mIoU. The reference's DDP all_reduce and `.cuda()` are made no-ops for the
test; its files are untouched. The model is a fixed 1x1 conv plus a term from the window's mean
colour, so that its output depends on the window: a pure per-pixel model would hide any
difference in the window grid (every pixel's summed softmax would be a multiple of the same vector).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline.evaluate as pe
from tests.conftest import SHARED
from tests.reference import reference_modules

FIX = SHARED / "fixtures"
CITY = [
    (
        f"cityscapes/leftImg8bit/val/frankfurt/{i}_leftImg8bit.png",
        f"cityscapes_derived/gtFine/val/frankfurt/{i}_gtFine_labelTrainIds.png",
    )
    for i in ("frankfurt_000001_029086", "frankfurt_000001_041517", "frankfurt_000001_055062")
]
VOC = [
    (f"voc/VOCdevkit/VOC2012/JPEGImages/{i}.jpg", f"voc/SegmentationClassAug_palette/{i}.png")
    for i in ("2007_000042", "2007_000123", "2007_000129", "2008_000051", "2008_000195")
]


class WindowModel(torch.nn.Module):
    """Per-pixel 1x1 conv + a bias from the window's mean colour: cheap, deterministic, window-aware."""

    def __init__(self, classes: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.pixel = torch.nn.Conv2d(3, classes, 1)
        self.window = torch.nn.Conv2d(3, classes, 1, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            self.window.weight.mul_(4.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pixel(x) + self.window(x.mean((2, 3), keepdim=True))


@pytest.fixture(scope="module")
def ref():
    with reference_modules("supervised", "dataset.transform") as mods:
        yield mods


def _load(pairs, size: tuple[int, int] | None):
    """uint8 (1, 3, H, W) image and (1, H, W) label per pair; `size` (W, H) downscales both."""
    out = []
    for img_rel, mask_rel in pairs:
        if not (FIX / img_rel).exists():
            pytest.skip(f"fixture {img_rel} not available")
        img = Image.open(FIX / img_rel).convert("RGB")
        mask = Image.fromarray(np.array(Image.open(FIX / mask_rel)))
        if size is not None:
            img, mask = img.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
        out.append((img, mask))
    return out


def _run_reference(ref, monkeypatch, model, samples, mode, crop, nclass):
    supervised, transform = ref
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(supervised.dist, "all_reduce", lambda t, *a, **k: t)
    preds = []
    inter_union = supervised.intersectionAndUnion

    def record(output, target, k, ignore_index=255):
        preds.append(torch.from_numpy(output.copy()))
        return inter_union(output, target, k, ignore_index)

    monkeypatch.setattr(supervised, "intersectionAndUnion", record)
    loader = []
    for i, (img, mask) in enumerate(samples):
        x, y = transform.normalize(img, mask)
        loader.append((x[None], y[None], [str(i)]))
    miou, iou = supervised.evaluate(model, loader, mode, {"crop_size": crop, "nclass": nclass})
    return preds, miou, iou


def _run_ours(monkeypatch, model, samples, mode, crop, nclass):
    preds = []
    confusion = pe.confusion_matrix

    def record(pred, target, k, ignore_index=255):
        preds.append(pred.clone())
        return confusion(pred, target, k, ignore_index)

    monkeypatch.setattr(pe, "confusion_matrix", record)
    batches = [
        {
            "image": torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].contiguous(),
            "mask": torch.from_numpy(np.array(mask)).long()[None],
        }
        for img, mask in samples
    ]
    return preds, pe.evaluate(model, batches, nclass, torch.device("cpu"), mode, crop)


# (W, H) of the images, crop: downscaled frames with truncated border windows whose starts run
# past the last full window (row 198 of 200, column 396 of 412), and the paper's 2048x1024 / 801
SLIDING = [((412, 200), 100), ((256, 128), 60), (None, 801)]


@pytest.mark.parametrize("size,crop", SLIDING, ids=["412x200-c100", "256x128-c60", "2048x1024-c801"])
def test_sliding_window_matches_reference(ref, monkeypatch, size, crop):
    samples = _load(CITY if size is not None else CITY[:1], size)
    model = WindowModel(19).eval()
    ref_preds, ref_miou, ref_iou = _run_reference(
        ref, monkeypatch, model, samples, "sliding_window", crop, 19
    )
    preds, ev = _run_ours(monkeypatch, model, samples, "sliding", crop, 19)
    for ours, theirs in zip(preds, ref_preds, strict=True):
        assert torch.equal(ours, theirs)
    assert np.allclose(ev["iou"], ref_iou, rtol=1e-12, atol=0)
    assert ev["miou"] == pytest.approx(float(ref_miou), rel=1e-12)
    assert 0 < ev["miou"] < 100  # the case is not degenerate


def test_original_mode_matches_reference(ref, monkeypatch):
    samples = _load(VOC, None)
    model = WindowModel(21, seed=1).eval()
    ref_preds, ref_miou, ref_iou = _run_reference(ref, monkeypatch, model, samples, "original", 321, 21)
    preds, ev = _run_ours(monkeypatch, model, samples, "whole", 321, 21)
    for ours, theirs in zip(preds, ref_preds, strict=True):
        assert torch.equal(ours, theirs)
    assert np.allclose(ev["iou"], ref_iou, rtol=1e-12, atol=0)
    assert ev["miou"] == pytest.approx(float(ref_miou), rel=1e-12)
    assert 0 < ev["miou"] < 100
