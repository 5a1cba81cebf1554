"""Loss terms against hand computations."""

import math

import pytest
import torch

from pipeline.method.losses import consistency_loss, masked_ce, ohem_ce, supervised_ce, zscore


def logits_1x1(*pixels):
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, len(pixels))


def test_masked_ce_normalises_by_valid_not_kept_pixels():
    # two classes, logits (0, 0) -> CE = ln 2 for either target; (ln 3, 0) -> p0 = 3/4
    lg = logits_1x1((0.0, 0.0), (math.log(3), 0.0), (0.0, 0.0), (5.0, 5.0))
    target = torch.tensor([[[0, 0, 1, 255]]])
    keep = torch.tensor([[[True, True, False, True]]])
    valid = torch.tensor([[[True, True, True, False]]])
    # kept & valid: px0 (ln 2) + px1 (-ln 3/4); divided by 3 valid pixels
    expected = (math.log(2) - math.log(0.75)) / 3
    assert masked_ce(lg, target, keep, valid).item() == pytest.approx(expected, rel=1e-6)


def test_masked_ce_without_valid_pixels_is_zero_with_a_graph():
    lg = logits_1x1((1.0, 0.0)).requires_grad_()
    out = masked_ce(lg, torch.tensor([[[0]]]), torch.tensor([[[True]]]), torch.tensor([[[False]]]))
    out.backward()
    assert out.item() == 0.0 and lg.grad is not None


def test_zscore_uses_unbiased_std():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 4, 1, 1)
    mean, std = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 3)  # n - 1 = 3
    assert torch.allclose(zscore(x).flatten(), torch.tensor([(v - mean) / std for v in (1, 2, 3, 6)]))


def test_consistency_both_modes_hand_computed_and_two_sided_gradient():
    a = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1).requires_grad_()
    b = torch.tensor([3.0, 2.0, 1.0]).view(1, 3, 1, 1).requires_grad_()
    # z(a) = (-1, 0, 1), z(b) = (1, 0, -1): squared diffs 4, 0, 4 -> mean over 3 elements
    assert consistency_loss(a, b, "zscore_mse").item() == pytest.approx(8 / 3)
    # no stop-gradient: both views receive a gradient (a non-degenerate pair)
    c = torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1).requires_grad_()
    d = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).requires_grad_()
    consistency_loss(c, d, "zscore_mse").backward()
    assert c.grad.abs().sum() > 0 and d.grad.abs().sum() > 0
    # paper: sum over classes of (a - b)^2 = 4 + 0 + 4 = 8, divided by W*H = 1, averaged over N = 1
    assert consistency_loss(a, b, "raw_l2").item() == pytest.approx(8.0)
    with pytest.raises(ValueError, match="con_mode"):
        consistency_loss(a, b, "cosine")


def test_ohem_keeps_all_when_few_valid_pixels():
    lg = logits_1x1((2.0, 0.0), (0.0, 2.0), (0.0, 0.0))
    target = torch.tensor([[[0, 0, 255]]])
    assert ohem_ce(lg, target, min_kept=5).item() == pytest.approx(supervised_ce(lg, target).item())


def test_ohem_mines_the_hard_pixels():
    # GT-class probabilities: px0 sigmoid(4) = 0.982, px1 0.5, px2 sigmoid(-1) = 0.269, px3 sigmoid(2) = 0.881
    lg = logits_1x1((4.0, 0.0), (0.0, 0.0), (0.0, 1.0), (2.0, 0.0))
    target = torch.tensor([[[0, 0, 0, 0]]])
    # min_kept = 2 < 4 valid: 2nd smallest prob = 0.5 -> threshold max(0.7, 0.5) = 0.7 -> keep px1, px2
    expected = (math.log(2) + math.log(1 + math.e)) / 2
    assert ohem_ce(lg, target, thresh=0.7, min_kept=2).item() == pytest.approx(expected, rel=1e-5)
    # min_kept = 3: 3rd smallest = 0.881 > 0.7 -> threshold 0.881 -> keep px1, px2, px3
    expected3 = (math.log(2) + math.log(1 + math.e) + math.log(1 + math.exp(-2))) / 3
    assert ohem_ce(lg, target, thresh=0.7, min_kept=3).item() == pytest.approx(expected3, rel=1e-5)
