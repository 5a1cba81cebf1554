"""EMA teacher: parameters AND buffers follow the student (dssn-method.md §4.3)."""

from __future__ import annotations

import copy

import torch
from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen deep copy: the teacher only moves through `ema_update`, never through the optimizer."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, keep: float) -> None:
    """t <- keep * t + (1 - keep) * s over the whole state_dict (BN running stats included).

    Integer buffers (num_batches_tracked) are blended in floating point and truncated back to
    their dtype, as the reference does. keep = 0 gives an exact copy (the VOC first iteration).
    Float entries go through `_foreach` kernels: one launch per op instead of one per tensor.
    Wrapper prefixes (DDP `module.`, compile `_orig_mod.`) are ignored when matching keys.
    """
    s_state = {_strip(k): v for k, v in student.state_dict().items()}
    floats_t: list[torch.Tensor] = []
    floats_s: list[torch.Tensor] = []
    for key, t in teacher.state_dict().items():
        name = _strip(key)
        if name not in s_state:
            raise KeyError(f"ema_update: student has no entry {name!r} (teacher key {key!r})")
        s = s_state[name].detach()
        if t.is_floating_point():
            floats_t.append(t)
            floats_s.append(s.to(dtype=t.dtype))
        else:
            t.copy_((keep * t.double() + (1.0 - keep) * s.double()).to(t.dtype))
    if not floats_t:
        return
    if keep == 0.0:
        torch._foreach_copy_(floats_t, floats_s)
    else:
        torch._foreach_mul_(floats_t, keep)
        torch._foreach_add_(floats_t, floats_s, alpha=1.0 - keep)
