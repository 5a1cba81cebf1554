"""Adaptive per-class thresholds (`selection: adaptive`, beyond the paper) on hand-worked maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.method.cplg import AdaptiveThresholds, adaptive_mask
from tests.method.ddp import on_ranks
from tests.method.test_cplg import probs


def test_mask_keeps_pixels_at_or_above_their_class_threshold():
    p = probs(
        (0.95, 0.05), (0.85, 0.15), (0.4, 0.6), (0.5, 0.5), (0.45, 0.55), (0.1, 0.9), dtype=torch.float32
    )
    labels, keep = adaptive_mask(p, torch.tensor([0.9, 0.55]))
    assert labels.tolist() == [[[0, 0, 1, 0, 1, 1]]]  # the 0.5/0.5 tie goes to class 0
    assert keep.tolist() == [[[True, False, True, False, True, True]]]  # 0.55 >= 0.55 is kept
    ignore = torch.tensor([[[True, False, False, False, False, False]]])
    _, keep = adaptive_mask(p, torch.tensor([0.9, 0.55]), ignore=ignore)
    assert keep.tolist() == [[[False, False, True, False, True, True]]]


def test_update_hand_worked():
    """C=3, momentum 0.5, start 1/3. Valid pixels: two class-0 (0.9, 0.7), one class-1 (0.6); the
    class-2 pixel is ignored, so class 2 keeps 1/3.
    c = [1/6 + 0.8/2, 1/6 + 0.6/2, 1/3] = [17/30, 14/30, 10/30]
    g = 1/6 + (0.9 + 0.7 + 0.6)/3/2 = 16/30;  thresholds = g * c / max(c) = 16/30 * [1, 14/17, 10/17]
    """
    t = AdaptiveThresholds(3, momentum=0.5)
    assert torch.allclose(t.value(), torch.full((3,), 1 / 3))
    p = probs((0.9, 0.05, 0.05), (0.7, 0.2, 0.1), (0.2, 0.6, 0.2), (0.1, 0.1, 0.8))
    t.update(p, torch.tensor([[[True, True, True, False]]]))
    assert torch.allclose(t.c, torch.tensor([17 / 30, 14 / 30, 10 / 30]))
    assert float(t.g) == pytest.approx(16 / 30)
    assert torch.allclose(t.value(), torch.tensor([16 / 30, 16 / 30 * 14 / 17, 16 / 30 * 10 / 17]))


def test_a_batch_with_no_valid_pixel_changes_nothing():
    t = AdaptiveThresholds(2, momentum=0.9)
    t.update(probs((0.9, 0.1), (0.3, 0.7)), torch.ones(1, 1, 2, dtype=torch.bool))
    before = t.state_dict()
    t.update(probs((0.99, 0.01), (0.99, 0.01)), torch.zeros(1, 1, 2, dtype=torch.bool))
    after = t.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_state_dict_round_trip():
    t = AdaptiveThresholds(4, momentum=0.7)
    prob = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3).softmax(1)
    t.update(prob, torch.ones(2, 8, 8, dtype=torch.bool))
    u = AdaptiveThresholds(4, momentum=0.7)
    u.load_state_dict(t.state_dict())
    assert torch.equal(u.value(), t.value())


def _matches_loop(prob: torch.Tensor, valid: torch.Tensor, m: float) -> tuple[float, np.ndarray]:
    """The same EMA step written as a plain loop over pixels, from 1/C."""
    p, v = prob.double().numpy(), valid.numpy()
    k = p.shape[1]
    confs: list[float] = []
    per: dict[int, list[float]] = {}
    for n in range(p.shape[0]):
        for i in range(p.shape[2]):
            for j in range(p.shape[3]):
                if v[n, i, j]:
                    c = int(p[n, :, i, j].argmax())
                    confs.append(float(p[n, c, i, j]))
                    per.setdefault(c, []).append(float(p[n, c, i, j]))
    g = m / k + (1 - m) * np.mean(confs)
    c = np.array([m / k + (1 - m) * np.mean(per[j]) if j in per else 1 / k for j in range(k)])
    return g, c


def test_matches_a_pixel_loop_on_random_maps():
    gen = torch.Generator().manual_seed(3)
    prob = (torch.randn(2, 5, 6, 7, generator=gen) * 2).softmax(1)
    valid = torch.rand(2, 6, 7, generator=gen) > 0.3
    t = AdaptiveThresholds(5, momentum=0.8)
    t.update(prob, valid)
    g, c = _matches_loop(prob, valid, 0.8)
    assert float(t.g) == pytest.approx(g, rel=1e-5)
    assert np.allclose(t.c.numpy(), c, rtol=1e-5)


def _update_own_half(rank: int, world: int, prob: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    t = AdaptiveThresholds(prob.shape[1], momentum=0.6)
    t.update(prob[rank::world], valid[rank::world])  # each rank sees its own half
    return torch.cat([t.g[None], t.c])


def test_ddp_ranks_share_one_state_equal_to_the_whole_batch(tmp_path):
    gen = torch.Generator().manual_seed(5)
    prob = (torch.randn(4, 3, 5, 5, generator=gen) * 2).softmax(1)
    valid = torch.rand(4, 5, 5, generator=gen) > 0.2
    whole = AdaptiveThresholds(3, momentum=0.6)
    whole.update(prob, valid)
    got = on_ranks(_update_own_half, 2, tmp_path, prob, valid)
    expected = torch.cat([whole.g[None], whole.c])
    assert torch.allclose(got[0], expected, atol=1e-6) and torch.equal(got[0], got[1])
    alone = AdaptiveThresholds(3, momentum=0.6)
    alone.update(prob[0::2], valid[0::2])
    assert not torch.allclose(torch.cat([alone.g[None], alone.c]), expected)  # the sync mattered
