"""EMA teacher: parameters and buffers (spec §4.3)."""

import pytest
import torch
from torch import nn

from pipeline.method.ema import ema_update, make_teacher


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))


def _set(net, w, b, rm, rv, nbt):
    with torch.no_grad():
        net[0].weight.fill_(w)
        net[0].bias.fill_(b)
        net[1].running_mean.fill_(rm)
        net[1].running_var.fill_(rv)
        net[1].num_batches_tracked.fill_(nbt)


def test_teacher_is_a_frozen_independent_copy():
    student = _net()
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())  # student untouched
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values(), strict=True):
        assert torch.equal(t, s) and t.data_ptr() != s.data_ptr()


def test_ema_keep_half_blends_params_and_buffers_and_truncates_ints():
    student, teacher = _net(), make_teacher(_net())
    _set(teacher, w=1.0, b=-2.0, rm=0.0, rv=1.0, nbt=2)
    _set(student, w=3.0, b=2.0, rm=4.0, rv=3.0, nbt=5)
    ema_update(teacher, student, keep=0.5)
    assert teacher[0].weight.item() == 2.0  # 0.5*1 + 0.5*3
    assert teacher[0].bias.item() == 0.0  # 0.5*-2 + 0.5*2
    assert teacher[1].running_mean.item() == 2.0  # 0.5*0 + 0.5*4: buffers follow too
    assert teacher[1].running_var.item() == 2.0  # 0.5*1 + 0.5*3
    assert teacher[1].num_batches_tracked.item() == 3  # 0.5*2 + 0.5*5 = 3.5, truncated
    assert teacher[1].num_batches_tracked.dtype == torch.int64
    assert not teacher[0].weight.requires_grad
    # the student is not modified
    assert student[0].weight.item() == 3.0 and student[1].num_batches_tracked.item() == 5


def test_ema_paper_keep():
    student, teacher = _net(), make_teacher(_net())
    _set(teacher, w=1.0, b=0.0, rm=10.0, rv=1.0, nbt=1000)
    _set(student, w=0.0, b=1.0, rm=0.0, rv=1.0, nbt=1001)
    ema_update(teacher, student, keep=0.996)
    assert teacher[0].weight.item() == pytest.approx(0.996)
    assert teacher[0].bias.item() == pytest.approx(0.004)
    assert teacher[1].running_mean.item() == pytest.approx(9.96)
    assert teacher[1].num_batches_tracked.item() == 1000  # 1000.004 truncated


def test_ema_keep_zero_is_an_exact_copy():
    student, teacher = _net(), make_teacher(_net())
    _set(teacher, w=7.0, b=7.0, rm=7.0, rv=7.0, nbt=7)
    with torch.no_grad():
        student[0].weight.copy_(torch.tensor(0.123456789).view(1, 1, 1, 1))
    student[1].num_batches_tracked.fill_(11)
    ema_update(teacher, student, keep=0.0)
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values(), strict=True):
        assert torch.equal(t, s)


def test_ema_matches_keys_through_a_wrapper_and_rejects_a_mismatch():
    class Wrapped(nn.Module):  # like DDP: the model sits under `module.`
        def __init__(self, m):
            super().__init__()
            self.module = m

    student, teacher = _net(), make_teacher(_net())
    _set(teacher, w=1.0, b=1.0, rm=1.0, rv=1.0, nbt=1)
    _set(student, w=3.0, b=3.0, rm=3.0, rv=3.0, nbt=3)
    ema_update(teacher, Wrapped(student), keep=0.5)
    assert teacher[0].weight.item() == 2.0
    with pytest.raises(KeyError, match="student has no entry"):
        ema_update(teacher, nn.Sequential(nn.Conv2d(1, 1, 1)), keep=0.5)


def test_ema_on_second_device(second):
    student, teacher = second.module(_net()), second.module(make_teacher(_net()))
    _set(teacher, w=1.0, b=-2.0, rm=0.0, rv=1.0, nbt=2)
    _set(student, w=3.0, b=2.0, rm=4.0, rv=3.0, nbt=5)
    ema_update(teacher, student, keep=0.5)
    assert teacher[0].weight.item() == 2.0 and teacher[1].num_batches_tracked.item() == 3
