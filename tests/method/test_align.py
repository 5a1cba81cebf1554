"""Distribution alignment of the pseudo-label maps (`method.pl_align`, beyond the paper)."""

from __future__ import annotations

import pytest
import torch

from pipeline.method.align import DistributionAlignment
from tests.method.ddp import on_ranks
from tests.method.test_cplg import probs


def test_hand_worked_update_and_apply_can_flip_the_argmax():
    """C=2, momentum 0.5, start 1/2. Teacher: valid pixels (0.8, 0.2), (0.6, 0.4), the third ignored
    -> mean (0.7, 0.3), pred = (0.6, 0.4). Labels 0, 1, 1 and one 255 -> (1/3, 2/3), prior =
    (5/12, 7/12). Ratio = (25/36, 35/24): (0.6, 0.4) becomes (5/12, 7/12), now class 1;
    (0.8, 0.2) becomes (0.8*25/36, 0.2*35/24) / 0.847222 = (0.655738, 0.344262)."""
    a = DistributionAlignment(2, momentum=0.5)
    p = probs((0.8, 0.2), (0.6, 0.4), (0.0, 1.0))
    a.update(p, torch.tensor([[[True, True, False]]]), torch.tensor([[[0, 1], [1, 255]]]))
    assert torch.allclose(a.pred, torch.tensor([0.6, 0.4]))
    assert torch.allclose(a.prior, torch.tensor([5 / 12, 7 / 12]))
    q = a.apply(probs((0.6, 0.4), (0.8, 0.2), dtype=torch.float32))
    assert torch.allclose(q[0, :, 0, 0], torch.tensor([5 / 12, 7 / 12]))
    assert torch.allclose(q[0, :, 0, 1], torch.tensor([0.655738, 0.344262]), atol=1e-6)
    assert q.argmax(1).tolist() == [[[1, 0]]]


def test_no_pixels_change_nothing_and_state_round_trips():
    a = DistributionAlignment(3, momentum=0.9)
    a.update(probs((0.7, 0.2, 0.1)), torch.ones(1, 1, 1, dtype=torch.bool), torch.tensor([[[2]]]))
    before = a.state_dict()
    a.update(probs((0.1, 0.1, 0.8)), torch.zeros(1, 1, 1, dtype=torch.bool), torch.tensor([[[255]]]))
    assert all(torch.equal(before[k], a.state_dict()[k]) for k in before)
    b = DistributionAlignment(3)
    b.load_state_dict(before)
    p = probs((0.5, 0.3, 0.2), dtype=torch.float32)
    assert torch.equal(a.apply(p), b.apply(p))
    assert float(a.apply(p).sum()) == pytest.approx(1.0)


def _update_own_half(rank: int, world: int, prob, valid, labels) -> torch.Tensor:
    a = DistributionAlignment(prob.shape[1], momentum=0.3)
    a.update(prob[rank::world], valid[rank::world], labels[rank::world])
    return torch.cat([a.prior, a.pred])


def test_ddp_ranks_share_the_whole_batch_state(tmp_path):
    gen = torch.Generator().manual_seed(7)
    prob = (torch.randn(4, 3, 5, 5, generator=gen) * 2).softmax(1)
    valid = torch.rand(4, 5, 5, generator=gen) > 0.2
    labels = torch.randint(0, 3, (4, 5, 5), generator=gen)
    labels[0, :2] = 255
    whole = DistributionAlignment(3, momentum=0.3)
    whole.update(prob, valid, labels)
    got = on_ranks(_update_own_half, 2, tmp_path, prob, valid, labels)
    assert torch.allclose(got[0], torch.cat([whole.prior, whole.pred]), atol=1e-6)
    assert torch.equal(got[0], got[1])
