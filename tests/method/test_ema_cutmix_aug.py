"""EMA teacher, CutMix boxes/compositing and the strong photometric views."""

import torch
from torch import nn

from pipeline.method.cutmix import paste, sample_boxes
from pipeline.method.ema import ema_update, make_teacher
from pipeline.method.strong_aug import strong_augment


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))


def test_ema_blends_params_and_buffers_and_truncates_int_buffers():
    student = _net()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        teacher[0].weight.fill_(1.0)
        student[0].weight.fill_(3.0)
        teacher[1].running_mean.fill_(0.0)
        student[1].running_mean.fill_(4.0)
        teacher[1].num_batches_tracked.fill_(2)
        student[1].num_batches_tracked.fill_(5)
    ema_update(teacher, student, keep=0.5)
    assert teacher[0].weight.item() == 2.0  # 0.5*1 + 0.5*3
    assert teacher[1].running_mean.item() == 2.0  # buffers follow too
    assert teacher[1].num_batches_tracked.item() == 3  # 3.5 truncated
    ema_update(teacher, student, keep=0.0)
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values(), strict=True):
        assert torch.equal(t, s)


def test_cutmix_boxes_statistics_and_determinism():
    g = torch.Generator().manual_seed(3)
    boxes = sample_boxes(400, 32, p=0.5, generator=g)
    area = boxes.flatten(1).float().mean(1)
    with_box = area[area > 0]
    assert 150 < len(with_box) < 250  # p = 0.5
    # integer rounding of w, h can shave a little off the 0.02 lower bound
    assert with_box.min() >= 0.01 and with_box.max() <= 0.4
    assert not sample_boxes(5, 32, p=0.0, generator=g).any()
    a = sample_boxes(8, 32, generator=torch.Generator().manual_seed(1))
    b = sample_boxes(8, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_paste_composites_labels_ignore_and_images():
    box = torch.tensor([[[False, True], [False, True]]])
    dst_lab, src_lab = torch.tensor([[[1, 1], [1, 1]]]), torch.tensor([[[2, 255], [2, 2]]])
    assert paste(dst_lab, src_lab, box).tolist() == [[[1, 255], [1, 2]]]
    ign_dst, ign_src = torch.zeros(1, 2, 2, dtype=torch.bool), torch.ones(1, 2, 2, dtype=torch.bool)
    assert paste(ign_dst, ign_src, box).tolist() == [[[False, True], [False, True]]]
    img = paste(torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2), box)
    assert img[0, :, :, 1].eq(1).all() and img[0, :, :, 0].eq(0).all()


def test_strong_views_independent_per_sample_and_deterministic():
    x = torch.rand(1, 3, 24, 24).repeat(4, 1, 1, 1)
    x0 = x.clone()
    a = strong_augment(x, torch.Generator().manual_seed(0), intensity_ops=True)
    b = strong_augment(x, torch.Generator().manual_seed(0), intensity_ops=True)
    assert torch.equal(a, b)
    assert torch.equal(x, x0)  # input untouched
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert any(not torch.allclose(a[0], a[i]) for i in range(1, 4))  # own draws per sample
    c = strong_augment(x, torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)
