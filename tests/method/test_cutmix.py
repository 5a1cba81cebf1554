"""CutMix boxes (spec §7.4) and compositing of images, labels, ignore maps and logits."""

import math

import torch

from pipeline.method.cutmix import _one_box, paste, sample_boxes

S = 64


def _floor_bound(size):
    """Smallest possible w*h: area 0.02 S^2 and the extreme aspect 0.3, both sides floored."""
    area = 0.02 * size * size
    return (math.sqrt(area / 0.3) - 1) * (math.sqrt(area * 0.3) - 1) / (size * size)


def test_box_parameters_fit_and_respect_area_and_aspect():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        y, x, h, w = _one_box(S, 1.0, g)
        assert x >= 0 and y >= 0 and x + w <= S and y + h <= S  # fits inside the crop
        assert _floor_bound(S) <= w * h / S**2 <= 0.4  # area U(0.02, 0.4) S^2 up to flooring
        # aspect h/w = r in [0.3, 1/0.3] up to flooring of each side
        assert 0.3 * (w - 1) / (w + 1) <= h / w <= (h + 1) / (h - 1) / 0.3


def test_box_statistics():
    boxes = sample_boxes(400, S, p=0.5, generator=torch.Generator().manual_seed(3))
    assert boxes.shape == (400, S, S) and boxes.dtype == torch.bool
    frac = boxes.flatten(1).float().mean(1)
    with_box = frac[frac > 0]
    assert 160 < len(with_box) < 240  # p = 0.5 (binomial sd 10)
    assert with_box.min() >= _floor_bound(S) and with_box.max() <= 0.4
    # mean of U(0.02, 0.4) is 0.21; flooring w and h loses a little
    assert 0.17 < with_box.mean() < 0.22
    for m in boxes[frac > 0][:50]:  # every box is one axis-aligned rectangle
        rows, cols = m.any(1), m.any(0)
        assert m.sum() == rows.sum() * cols.sum()
        assert torch.equal(m, rows[:, None] & cols[None, :])


def test_box_probability_extremes_and_determinism():
    g = torch.Generator().manual_seed(5)
    assert not sample_boxes(50, S, p=0.0, generator=g).any()
    assert sample_boxes(50, S, p=1.0, generator=g).flatten(1).any(1).all()
    a = sample_boxes(8, S, generator=torch.Generator().manual_seed(1))
    b = sample_boxes(8, S, generator=torch.Generator().manual_seed(1))
    c = sample_boxes(8, S, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sample_boxes(0, S, generator=g).shape == (0, S, S)
    assert sample_boxes(2, S, generator=g, device="cpu").device.type == "cpu"


def test_paste_composites_labels_and_ignore():
    box = torch.tensor([[[False, True], [False, True]]])
    dst_lab, src_lab = torch.tensor([[[1, 1], [3, 3]]]), torch.tensor([[[2, 255], [2, 4]]])
    assert paste(dst_lab, src_lab, box).tolist() == [[[1, 255], [3, 4]]]
    ign_dst = torch.tensor([[[True, False], [False, False]]])
    ign_src = torch.tensor([[[False, True], [False, False]]])
    # left column from dst (True, False), right column from src (True, False)
    assert paste(ign_dst, ign_src, box).tolist() == [[[True, True], [False, False]]]
    assert dst_lab.tolist() == [[[1, 1], [3, 3]]]  # inputs not modified


def test_paste_broadcasts_the_box_over_channels():
    box = torch.tensor([[[False, True], [True, False]]])
    dst, src = torch.zeros(1, 3, 2, 2), torch.arange(12.0).view(1, 3, 2, 2)
    out = paste(dst, src, box)
    for c in range(3):
        assert out[0, c].tolist() == [[0.0, 4 * c + 1.0], [4 * c + 2.0, 0.0]]
    # a 0/1 integer box works like the bool one (logit maps, C = 2)
    logits = paste(torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2), box.long())
    assert logits.sum().item() == 4.0 and logits[0, :, 0, 1].tolist() == [1.0, 1.0]


def test_boxes_and_paste_on_second_device_equal_cpu(second):
    cpu = sample_boxes(6, S, p=0.5, generator=torch.Generator().manual_seed(4))
    gpu = sample_boxes(6, S, p=0.5, generator=torch.Generator().manual_seed(4), device=second.device)
    assert gpu.device.type == second.device.type and torch.equal(gpu.cpu(), cpu)
    a, b = torch.randn(6, 3, S, S), torch.randn(6, 3, S, S)
    with second.autocast():  # channels-last bf16-autocast logits composited as on the fast path
        mixed = paste(second.to(a), second.to(b), gpu)
    assert torch.equal(mixed.cpu(), paste(a, b, cpu))
