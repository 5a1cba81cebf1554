"""CPLG and fixed-threshold selection on tiny hand-worked probability maps (spec §2)."""

import math

import pytest
import torch

from pipeline.method.cplg import cplg_mask, fixed_threshold_mask, keep_ratio_per_class


def probs(*pixels, dtype=torch.float64):
    """(1, C, 1, W) from per-pixel class-probability tuples (one tuple per pixel, left to right)."""
    return torch.tensor(pixels, dtype=dtype).T.reshape(1, len(pixels[0]), 1, len(pixels))


def test_hand_worked_cplg_threshold_can_fall_below_tau_low():
    # Class maxima over the image: c0 = 0.97, c1 = 0.93, c2 = 0.30.
    # Thresholds: c0 0.96*0.97 = 0.9312; c1 0.96*0.93 = 0.8928 (< tau_low 0.92); c2 dropped (0.30 <= 0.92).
    p = probs(
        (0.97, 0.02, 0.01),
        (0.93, 0.05, 0.02),
        (0.05, 0.93, 0.02),
        (0.08, 0.90, 0.02),
        (0.35, 0.35, 0.30),
        (0.40, 0.30, 0.30),
    )
    labels, keep = cplg_mask(p)
    # px4 is a c0/c1 tie -> argmax takes the first class
    assert labels.tolist() == [[[0, 0, 1, 1, 0, 0]]]
    # px0 0.97 > 0.9312 keep; px1 0.93 < 0.9312 drop; px2 0.93 > 0.8928 keep;
    # px3 0.90 > 0.8928 keep (a max(r*m, tau_low) rule would drop it); px4/px5 0.35/0.40 < 0.9312 drop
    assert keep.tolist() == [[[True, False, True, True, False, False]]]
    assert labels.dtype == torch.int64 and keep.dtype == torch.bool and keep.shape == (1, 1, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_whose_max_equals_tau_low_is_dropped(dtype):
    # class 0's best pixel is exactly 0.92: not strictly above tau_low -> class 0 gives nothing,
    # even with r = 0.5 (threshold 0.46 would otherwise keep px0 and px1).
    p = probs((0.92, 0.08), (0.60, 0.40), (0.04, 0.96), dtype=dtype)
    labels, keep = cplg_mask(p, r=0.5, tau_low=0.92)
    assert labels.tolist() == [[[0, 0, 1]]]
    assert keep.tolist() == [[[False, False, True]]]
    # just above the gate the same class is used: max 0.921 > 0.92, threshold 0.4605
    labels, keep = cplg_mask(probs((0.921, 0.079), (0.60, 0.40), (0.04, 0.96), dtype=dtype), r=0.5)
    assert keep.tolist() == [[[True, True, True]]]


def test_pixel_at_exactly_r_times_max_is_dropped():
    # c0 max 0.96 -> threshold 0.5 * 0.96 = 0.48; a pixel at exactly 0.48 fails the strict test
    # (columns need not sum to 1: the rule only looks at argmax and per-class maxima)
    p = probs((0.96, 0.04), (0.48, 0.47), (0.49, 0.46))
    _, keep = cplg_mask(p, r=0.5, tau_low=0.9)
    assert keep.tolist() == [[[True, False, True]]]


def test_absent_and_low_confidence_classes_give_no_pixel():
    # 4 classes. c3 is absent (never argmax, max 0.02). c2 is predicted at px2/px3 but its best
    # probability is 0.70 <= 0.92 -> every c2 pixel dropped. c0 max 0.99 -> thr 0.9504; c1 max 0.95 -> 0.912.
    p = probs(
        (0.99, 0.00, 0.00, 0.01),
        (0.02, 0.95, 0.02, 0.01),
        (0.10, 0.18, 0.70, 0.02),
        (0.30, 0.10, 0.60, 0.00),
        (0.05, 0.93, 0.01, 0.01),
    )
    labels, keep = cplg_mask(p)
    assert labels.tolist() == [[[0, 1, 2, 2, 1]]]
    assert keep.tolist() == [[[True, True, False, False, True]]]
    ratio = keep_ratio_per_class(labels, keep, 4)
    assert ratio[:3].tolist() == [1.0, 1.0, 0.0] and math.isnan(ratio[3])


def test_maxima_are_per_image_not_per_batch():
    a = probs((0.99, 0.01), (0.95, 0.05))
    b = probs((0.97, 0.03), (0.94, 0.06))
    _, keep = cplg_mask(torch.cat([a, b]))
    # image 0: threshold 0.96*0.99 = 0.9504 -> [keep, drop (0.95)];
    # image 1 (own max 0.97): 0.9312 -> [keep, keep]. A batch-wide max (0.99) would drop 0.94.
    assert keep.tolist() == [[[True, False]], [[True, True]]]


def test_ignored_pixels_still_set_the_class_maximum():
    # c1's maximum 0.95 sits at the ignored px0 -> threshold 0.96*0.95 = 0.912: px1 (0.915) kept,
    # px2 (0.90) dropped. A maximum over non-ignored pixels only (0.915 -> 0.8784) would keep px2.
    p = probs((0.05, 0.95), (0.085, 0.915), (0.10, 0.90))
    ignore = torch.tensor([[[True, False, False]]])
    _, keep = cplg_mask(p, ignore=ignore)
    assert keep.tolist() == [[[False, True, False]]]


def test_ignore_pixels_never_kept():
    p = probs((0.99, 0.01), (0.96, 0.04))
    ignore = torch.tensor([[[True, False]]])
    _, keep = cplg_mask(p, ignore=ignore)
    # max 0.99 from the ignored pixel still sets the threshold 0.9504: px1 0.96 kept, px0 ignored
    assert keep.tolist() == [[[False, True]]]
    _, keep = cplg_mask(probs((0.99, 0.01), (0.95, 0.05)), ignore=ignore)
    assert keep.tolist() == [[[False, False]]]  # 0.95 < 0.9504
    # a 0/1 integer ignore map behaves like the bool one
    _, keep = cplg_mask(p, ignore=ignore.to(torch.uint8))
    assert keep.tolist() == [[[False, True]]]


def _count_rule_reference(prob, r, tau_low):
    """The reference's formulation written with explicit loops: count classes above their threshold."""
    n, c, h, w = prob.shape
    keep = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        tau = []
        for j in range(c):
            m = prob[i, j].max().item()
            tau.append(r * m if m > tau_low else m)
        for y in range(h):
            for x in range(w):
                count = sum(int(prob[i, j, y, x].item() > tau[j]) for j in range(c))
                keep[i, y, x] = count == 1
    return keep


def test_matches_loop_reference_on_random_maps():
    g = torch.Generator().manual_seed(0)
    prob = (torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) * 4).softmax(1)
    _, keep = cplg_mask(prob)
    expected = _count_rule_reference(prob, 0.96, 0.92)
    assert torch.equal(keep, expected)
    assert 0 < keep.sum() < keep.numel()  # the example exercises both outcomes
    # per image: the batch result is the concatenation of the single-image results
    single = torch.cat([cplg_mask(prob[i : i + 1])[1] for i in range(3)])
    assert torch.equal(keep, single)


def test_bf16_input_is_compared_in_float32():
    # bf16-exact values: c0 max 1.0, px1 = 246/256 = 0.9609375. Exact threshold 0.96 -> px1 kept.
    # Computed in bf16, 0.96 * 1.0 would round up to 0.9609375 and the strict test would drop px1.
    prob = probs((1.0, 0.0), (0.9609375, 0.0390625)).to(torch.bfloat16)
    labels, keep = cplg_mask(prob)
    assert keep.tolist() == [[[True, True]]] and labels.dtype == torch.int64


def test_fixed_threshold_inclusive_and_exclusive():
    p = probs((0.95, 0.05), (0.94, 0.06), (0.02, 0.98), dtype=torch.float32)
    labels, keep = fixed_threshold_mask(p, 0.95)
    assert labels.tolist() == [[[0, 0, 1]]]
    assert keep.tolist() == [[[True, False, True]]]  # >= keeps the 0.95 pixel
    assert fixed_threshold_mask(p, 0.95, inclusive=False)[1].tolist() == [[[False, False, True]]]
    assert fixed_threshold_mask(p, 0.0)[1].all()  # Cityscapes conf_thresh 0: everything
    ignore = torch.tensor([[[False, False, True]]])
    assert fixed_threshold_mask(p, 0.95, ignore=ignore)[1].tolist() == [[[True, False, False]]]


def test_keep_ratio_per_class_with_valid():
    labels = torch.tensor([[[0, 0, 1, 1, 1]]])
    keep = torch.tensor([[[True, False, True, True, True]]])
    valid = torch.tensor([[[True, True, True, False, True]]])
    r = keep_ratio_per_class(labels, keep, 3, valid=valid)
    # c0: 1 kept of 2 predicted; c1: px3 not valid -> 2 kept of 2; c2 never predicted -> NaN
    assert r[0].item() == 0.5 and r[1].item() == 1.0 and math.isnan(r[2].item())
    assert keep_ratio_per_class(labels, keep, 3)[1].item() == 1.0


def test_second_device_matches_cpu(second):
    prob = (torch.randn(2, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 4).softmax(1)
    ignore = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(1)) < 0.2
    labels, keep = cplg_mask(prob, ignore=ignore)
    with second.autocast():
        labels_c, keep_c = cplg_mask(second.to(prob), ignore=second.to(ignore))
    assert keep_c.device.type == second.device.type
    assert torch.equal(labels_c.cpu(), labels) and torch.equal(keep_c.cpu(), keep)
