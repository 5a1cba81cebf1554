"""Loss terms against hand computations (spec §3, §6.3)."""

import math

import pytest
import torch

from pipeline.method.losses import (
    consistency_loss,
    masked_ce,
    ohem_ce,
    selection_weights,
    supervised_ce,
    zscore,
)


def logits_row(*pixels):
    """(1, C, 1, W) logits from per-pixel tuples."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, len(pixels[0]), 1, len(pixels))


def softplus(v):
    return math.log1p(math.exp(v))


# ---------------------------------------------------------------- masked / supervised CE


def test_masked_ce_normalises_by_valid_not_kept_pixels():
    # Two classes. CE of logits (0, 0) = ln 2 for either target; logits (ln 3, 0) -> p0 = 3/4.
    lg = logits_row((0.0, 0.0), (math.log(3), 0.0), (0.0, 0.0), (5.0, 5.0), (1.0, -1.0))
    target = torch.tensor([[[0, 0, 1, 255, 1]]])  # 255 at a non-valid pixel must not crash CE
    keep = torch.tensor([[[True, True, False, True, False]]])
    valid = torch.tensor([[[True, True, True, False, True]]])
    # kept & valid: px0 (ln 2) + px1 (-ln 0.75) = 0.98083; 4 valid pixels (px3 is not valid)
    expected = (math.log(2) - math.log(0.75)) / 4
    out = masked_ce(lg, target, keep, valid)
    assert out.item() == pytest.approx(expected, rel=1e-6)
    # dividing by the 2 kept pixels instead would give twice that
    assert out.item() != pytest.approx((math.log(2) - math.log(0.75)) / 2, rel=1e-3)


def test_selection_weights_undo_the_gate_class_skew():
    # 9 valid pixels (one more is padding): the teacher predicts class 0 on 6 and class 1 on 2 and
    # class 2 on 1; the gate keeps 4 of class 0, 1 of class 1, none of class 2.
    labels = torch.tensor([[[0, 0, 0, 0, 0, 0, 1, 1, 2, 1]]])
    keep = torch.tensor([[[1, 1, 1, 1, 0, 0, 1, 0, 0, 1]]], dtype=torch.bool)
    valid = torch.tensor([[[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]]], dtype=torch.bool)
    w = selection_weights(labels, keep, valid, num_classes=3, cap=10.0)
    # shares predicted (6/9, 2/9), kept (4/5, 1/5): ratios 5/6 and 10/9; sum 4*5/6 + 10/9 = 40/9
    # -> scaled by 5 / (40/9) = 9/8: class 0 weighs 15/16, class 1 weighs 5/4
    assert w[0, 0, 0].item() == pytest.approx(15 / 16)
    assert w[0, 0, 6].item() == pytest.approx(5 / 4)
    assert (w[keep & valid]).sum().item() == pytest.approx(5.0)  # the kept pixels keep their count
    # masked CE with those weights: uniform logits over 3 classes -> CE = ln 3 per kept pixel
    lg = torch.zeros(1, 3, 1, 10)
    out = masked_ce(lg, labels, keep, valid, w)
    assert out.item() == pytest.approx((4 * 15 / 16 + 5 / 4) * math.log(3) / 9)
    # the cap: class 1's ratio 10/9 capped at 1 -> all ratios below or at 1, then rescaled to sum 5
    w = selection_weights(labels, keep, valid, num_classes=3, cap=1.0)
    assert w[0, 0, 0].item() == pytest.approx(5 * (5 / 6) / (4 * 5 / 6 + 1))
    assert w[0, 0, 6].item() == pytest.approx(5 * 1 / (4 * 5 / 6 + 1))
    # nothing kept: weights are 0, not NaN
    w = selection_weights(labels, torch.zeros_like(keep), valid, num_classes=3, cap=10.0)
    assert torch.equal(w, torch.zeros_like(w))


def test_masked_ce_over_a_batch_uses_the_batch_valid_count():
    # image 0: one kept pixel with CE ln 2; image 1: 3 valid pixels, none kept -> (ln 2) / 4 overall
    lg = torch.zeros(2, 3, 1, 2)
    target = torch.tensor([[[1, 0]], [[2, 2]]])
    keep = torch.tensor([[[True, False]], [[False, False]]])
    valid = torch.tensor([[[True, False]], [[True, True]]])
    # 3 classes, zero logits -> CE = ln 3 per pixel; 1 kept / 3 valid
    assert masked_ce(lg, target, keep, valid).item() == pytest.approx(math.log(3) / 3, rel=1e-6)


def test_masked_ce_out_of_range_target_at_a_valid_pixel_is_not_counted():
    lg = logits_row((0.0, 0.0), (0.0, 0.0))
    target = torch.tensor([[[1, 255]]])
    both = torch.ones(1, 1, 2, dtype=torch.bool)
    # px1 has no usable class: excluded from the sum, still counted as valid -> ln 2 / 2
    assert masked_ce(lg, target, both, both).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_masked_ce_without_valid_pixels_is_zero_with_a_graph():
    lg = logits_row((1.0, 0.0)).requires_grad_()
    none = torch.tensor([[[False]]])
    out = masked_ce(lg, torch.tensor([[[255]]]), torch.tensor([[[True]]]), none)
    out.backward()
    assert out.item() == 0.0 and lg.grad is not None and lg.grad.abs().sum() == 0


def test_masked_ce_gradient_only_at_kept_valid_pixels():
    lg = logits_row((0.0, 0.0), (0.0, 0.0)).requires_grad_()
    masked_ce(
        lg, torch.tensor([[[0, 0]]]), torch.tensor([[[True, False]]]), torch.ones(1, 1, 2, dtype=bool)
    ).backward()
    # d/dz0 of CE(z, 0)/2 at z = (0, 0): (p0 - 1)/2 = -0.25, d/dz1 = p1/2 = 0.25; px1 untouched
    assert lg.grad[0, :, 0, 0].tolist() == pytest.approx([-0.25, 0.25])
    assert lg.grad[0, :, 0, 1].tolist() == [0.0, 0.0]


def test_supervised_ce_mean_over_non_ignored():
    lg = logits_row((0.0, 0.0), (math.log(3), 0.0), (9.0, -9.0))
    target = torch.tensor([[[1, 0, 255]]])
    # (ln 2 + -ln 0.75) / 2 non-ignored pixels
    assert supervised_ce(lg, target).item() == pytest.approx((math.log(2) - math.log(0.75)) / 2, rel=1e-6)
    all_ignored = supervised_ce(lg.requires_grad_(), torch.full((1, 1, 3), 255))
    assert all_ignored.item() == 0.0 and all_ignored.requires_grad


# ---------------------------------------------------------------- OHEM


# Two classes, target 0: GT probability sigmoid(a) for logits (a, 0), CE = softplus(-a).
#   px0 (4, 0): p = 0.982   px1 (0, 0): p = 0.5   px2 (0, 1): p = sigmoid(-1) = 0.269
#   px3 (2, 0): p = 0.881   px4: ignored (logits (-5, 0) would make it the hardest if it counted)
OHEM_LOGITS = logits_row((4.0, 0.0), (0.0, 0.0), (0.0, 1.0), (2.0, 0.0), (-5.0, 0.0))
OHEM_TARGET = torch.tensor([[[0, 0, 0, 0, 255]]])
CE = [softplus(-4), math.log(2), softplus(1), softplus(-2)]


def test_ohem_keeps_all_valid_pixels_when_fewer_than_min_kept():
    # 4 valid < min_kept 5 -> every valid pixel, plain mean
    out = ohem_ce(OHEM_LOGITS, OHEM_TARGET, thresh=0.7, min_kept=5)
    assert out.item() == pytest.approx(sum(CE) / 4, rel=1e-5)
    # #valid == min_kept: the reference mines, but the 4th smallest (0.982) keeps every pixel anyway
    assert ohem_ce(OHEM_LOGITS, OHEM_TARGET, min_kept=4).item() == pytest.approx(sum(CE) / 4, rel=1e-5)


def test_ohem_threshold_is_thresh_when_kth_prob_is_lower():
    # min_kept 2 < 4 valid: 2nd smallest valid prob = 0.5 -> threshold max(0.7, 0.5) = 0.7
    # -> keep px1 (0.5), px2 (0.269); ignored px4 is not a candidate
    expected = (CE[1] + CE[2]) / 2
    assert ohem_ce(OHEM_LOGITS, OHEM_TARGET, thresh=0.7, min_kept=2).item() == pytest.approx(
        expected, rel=1e-5
    )


def test_ohem_threshold_is_kth_prob_when_higher():
    # min_kept 3: 3rd smallest = 0.881 > 0.7 -> threshold 0.881 -> keep px1, px2, px3 (<= is inclusive)
    expected = (CE[1] + CE[2] + CE[3]) / 3
    assert ohem_ce(OHEM_LOGITS, OHEM_TARGET, thresh=0.7, min_kept=3).item() == pytest.approx(
        expected, rel=1e-5
    )
    # a high base threshold wins over the k-th value: thresh 0.99 keeps all four
    assert ohem_ce(OHEM_LOGITS, OHEM_TARGET, thresh=0.99, min_kept=1).item() == pytest.approx(
        sum(CE) / 4, rel=1e-5
    )


def test_ohem_gradient_only_through_kept_pixels():
    lg = OHEM_LOGITS.clone().requires_grad_()
    ohem_ce(lg, OHEM_TARGET, thresh=0.7, min_kept=2).backward()
    per_pixel = lg.grad.abs().sum(1).flatten()
    assert (per_pixel[[1, 2]] > 0).all() and (per_pixel[[0, 3, 4]] == 0).all()


def test_ohem_all_ignored_is_zero_not_nan():
    out = ohem_ce(OHEM_LOGITS, torch.full((1, 1, 5), 255), min_kept=2)
    assert out.item() == 0.0


# ---------------------------------------------------------------- z-score and consistency


def test_zscore_uses_unbiased_std():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0]).view(1, 4, 1, 1)
    # mean 3; unbiased variance (4 + 1 + 0 + 9) / (4 - 1) = 14/3
    std = math.sqrt(14 / 3)
    expected = [(-2) / std, (-1) / std, 0.0, 3 / std]
    assert zscore(x).flatten().tolist() == pytest.approx(expected, rel=1e-6)
    # per pixel, along dim 1 only: a second pixel with another scale is standardised on its own
    y = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]).view(1, 3, 1, 2)
    assert zscore(y)[0, :, 0, 1].tolist() == pytest.approx([-1.0, 0.0, 1.0])


def test_consistency_zscore_mse_hand_computed():
    # pixel 0: a = (1, 2, 3) -> z = (-1, 0, 1) (unbiased std 1); b = (3, 2, 1) -> z = (1, 0, -1)
    #   squared differences 4, 0, 4.  pixel 1: identical vectors -> 0.
    # mean over N*C*H*W = 1*3*1*2 = 6 elements -> 8/6.  (A biased std would give 12/6.)
    a = torch.tensor([[1.0, 5.0], [2.0, 1.0], [3.0, 0.0]]).view(1, 3, 1, 2)
    b = torch.tensor([[3.0, 5.0], [2.0, 1.0], [1.0, 0.0]]).view(1, 3, 1, 2)
    assert consistency_loss(a, b).item() == pytest.approx(8 / 6, rel=1e-6)
    # z-scoring makes it blind to a per-pixel affine change of the logits
    assert consistency_loss(a, 2 * a + 5, "zscore_mse").item() == pytest.approx(0.0, abs=1e-10)


def test_consistency_raw_l2_hand_computed():
    # a = 0; b: image 0 pixels (1, 2), (0, 3) -> 5 + 9 = 14 / (W*H = 2) = 7
    #           image 1 pixels (1, 1), (2, 0) -> 2 + 4 = 6 / 2 = 3;   batch mean 5
    a = torch.zeros(2, 2, 1, 2)
    b = torch.tensor([[[[1.0, 0.0]], [[2.0, 3.0]]], [[[1.0, 2.0]], [[1.0, 0.0]]]])
    assert consistency_loss(a, b, "raw_l2").item() == pytest.approx(5.0)
    # unlike z-scoring, an affine change of the logits is penalised
    assert consistency_loss(b, 2 * b + 5, "raw_l2").item() > 1.0


@pytest.mark.parametrize("mode", ["zscore_mse", "raw_l2"])
def test_consistency_gradient_flows_to_both_views(mode):
    a = torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1).requires_grad_()
    b = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).requires_grad_()
    consistency_loss(a, b, mode).backward()
    assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    if mode == "raw_l2":  # d/da sum_c (a-b)^2 / (H*W*N) = 2 (a - b) with H = W = N = 1; d/db = -that
        assert a.grad.flatten().tolist() == pytest.approx([2.0, 2.0, 8.0])
        assert b.grad.flatten().tolist() == pytest.approx([-2.0, -2.0, -8.0])
    else:  # z(b) ignores shifting and scaling b, so its gradient is orthogonal to 1 and to b
        assert abs(b.grad.sum().item()) < 1e-6 and abs((b.grad * b.detach()).sum().item()) < 1e-6


def test_consistency_unknown_mode_names_mode_and_choices():
    a = torch.zeros(1, 3, 1, 1)
    with pytest.raises(ValueError, match=r"'cosine'.*zscore_mse.*raw_l2"):
        consistency_loss(a, a, "cosine")


def test_ohem_and_masked_ce_on_second_device_match_cpu(second):
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randint(0, 4, (2, 8, 8), generator=g).masked_fill(
        torch.rand(2, 8, 8, generator=g) < 0.2, 255
    )
    lg2, target2 = second.to(lg), second.to(target)
    cpu = ohem_ce(lg, target, min_kept=50)
    per_image = ohem_ce(lg, target, min_kept=30, chunk=1).item()
    keep, valid = target != 255, torch.rand(2, 8, 8, generator=g) < 0.9
    ref = masked_ce(lg, target, keep, valid).item()
    with second.autocast():
        assert ohem_ce(lg2, target2, min_kept=50).item() == pytest.approx(cpu.item(), rel=1e-5)
        assert ohem_ce(lg2, target2, min_kept=30, chunk=1).item() == pytest.approx(per_image, rel=1e-5)
        got = masked_ce(lg2, target2, second.to(keep), second.to(valid)).item()
    assert got == pytest.approx(ref, rel=1e-5)


def test_ohem_chunks_are_separate_calls_averaged():
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(4, 5, 6, 7, generator=g) * torch.tensor([0.3, 1.0, 3.0, 6.0]).view(4, 1, 1, 1)
    target = torch.randint(0, 5, (4, 6, 7), generator=g)
    target[:, :2] = 255
    for chunk in (1, 2, 4):
        parts = [ohem_ce(a, b, 0.7, 20) for a, b in zip(lg.split(chunk), target.split(chunk), strict=True)]
        assert ohem_ce(lg, target, 0.7, 20, chunk=chunk).item() == pytest.approx(
            torch.stack(parts).mean().item(), rel=1e-6
        )
    assert ohem_ce(lg, target, 0.7, 20, chunk=4).item() == pytest.approx(ohem_ce(lg, target, 0.7, 20).item())
    assert ohem_ce(lg, target, 0.7, 20, chunk=1).item() != pytest.approx(ohem_ce(lg, target, 0.7, 80).item())
    with pytest.raises(ValueError, match="chunks of 3"):
        ohem_ce(lg, target, 0.7, 20, chunk=3)
