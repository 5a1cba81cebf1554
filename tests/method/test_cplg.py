"""CPLG and fixed-threshold selection on tiny hand-worked probability maps."""

import math

import torch

from pipeline.method.cplg import cplg_mask, fixed_threshold_mask, keep_ratio_per_class


def probs(*pixels):
    """(1, C, 1, W) from per-pixel class probability tuples."""
    return torch.tensor(pixels, dtype=torch.float64).T.reshape(1, len(pixels[0]), 1, len(pixels))


def test_hand_worked_cplg():
    # Class maxima over the image: c0 = 0.97, c1 = 0.93, c2 = 0.30.
    # Thresholds: c0 0.96*0.97 = 0.9312; c1 0.96*0.93 = 0.8928 (below tau_low!); c2 dropped (0.30 <= 0.92).
    p = probs(
        (0.97, 0.02, 0.01),
        (0.93, 0.05, 0.02),
        (0.05, 0.93, 0.02),
        (0.08, 0.90, 0.02),
        (0.35, 0.35, 0.30),
        (0.40, 0.30, 0.30),
    )
    labels, keep = cplg_mask(p)
    assert labels.tolist() == [[[0, 0, 1, 1, 0, 0]]]
    # px0 0.97 > 0.9312 keep; px1 0.93 < 0.9312 drop; px2 0.93 > 0.8928 keep; px3 0.90 > 0.8928 keep;
    # px4/px5: argmax class 0 but 0.35/0.40 < 0.9312 -> drop
    assert keep.tolist() == [[[True, False, True, True, False, False]]]


def test_class_whose_max_equals_tau_low_is_dropped():
    p = probs((0.92, 0.08), (0.50, 0.50), (0.04, 0.96))
    labels, keep = cplg_mask(p, r=0.5, tau_low=0.92)
    # class 0 max = 0.92 exactly: not strictly above tau_low -> no pixel of class 0, however confident
    assert keep.tolist() == [[[False, False, True]]]
    assert labels.tolist() == [[[0, 0, 1]]]  # ties resolve to the first class (argmax)


def test_absent_class_and_per_image_maxima():
    a = probs((0.99, 0.01), (0.95, 0.05))
    b = probs((0.97, 0.03), (0.94, 0.06))
    _, keep = cplg_mask(torch.cat([a, b]))
    # image 0: threshold 0.9504 -> [keep, drop]; image 1 (own max 0.97): 0.9312 -> [keep, keep]
    # a batch-wide max (0.99) would have dropped 0.94 in image 1.
    assert keep.tolist() == [[[True, False]], [[True, True]]]


def test_ignore_pixels_never_kept_but_count_for_the_maximum():
    p = probs((0.99, 0.01), (0.96, 0.04))
    ignore = torch.tensor([[[True, False]]])
    _, keep = cplg_mask(p, ignore=ignore)
    # the maximum 0.99 comes from the ignored pixel (reference: max over all pixels) -> 0.9504 threshold
    assert keep.tolist() == [[[False, True]]]
    _, keep = cplg_mask(probs((0.99, 0.01), (0.95, 0.05)), ignore=ignore)
    assert keep.tolist() == [[[False, False]]]  # 0.95 < 0.9504


def test_fixed_threshold_inclusive_and_exclusive():
    p = probs((0.95, 0.05), (0.94, 0.06), (0.02, 0.98))
    assert fixed_threshold_mask(p, 0.95)[1].tolist() == [[[True, False, True]]]
    assert fixed_threshold_mask(p, 0.95, inclusive=False)[1].tolist() == [[[False, False, True]]]
    assert fixed_threshold_mask(p, 0.0)[1].all()


def test_keep_ratio_per_class():
    labels = torch.tensor([[[0, 0, 1, 1]]])
    keep = torch.tensor([[[True, False, True, True]]])
    r = keep_ratio_per_class(labels, keep, 3)
    assert r[0] == 0.5 and r[1] == 1.0 and math.isnan(r[2])
