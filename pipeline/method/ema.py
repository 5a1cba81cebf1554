"""EMA teacher: parameters AND buffers follow the student (dssn-method.md §4.3)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, keep: float) -> None:
    """t <- keep * t + (1 - keep) * s over the whole state_dict; int buffers blended then truncated."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    floats_t, floats_s = [], []
    for k, t in t_state.items():
        s = s_state[k]
        if t.is_floating_point():
            floats_t.append(t)
            floats_s.append(s.detach())
        else:  # num_batches_tracked: blended in float and truncated back, as the reference does
            t.copy_((keep * t.double() + (1 - keep) * s.double()).to(t.dtype))
    if floats_t:
        torch._foreach_mul_(floats_t, keep)
        torch._foreach_add_(floats_t, floats_s, alpha=1 - keep)
