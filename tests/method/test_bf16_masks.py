"""Pseudo-label selection under bf16 autocast: the same masks as fp32 on the same logits.

The fast path runs the teacher in bf16, so its logits are bf16; what is selected from them must not
depend on whether autocast is active (CUDA autocast runs softmax in fp32, CPU autocast would not).
Each check computes the masks once under CPU bf16 autocast from bf16 logits and once in fp32 from
the same logits upcast, and asserts they are identical (OHEM: the same loss to float rounding).
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import MethodCfg
from pipeline.method.align import DistributionAlignment
from pipeline.method.cplg import AdaptiveThresholds
from pipeline.method.dssn import pl_prob, select
from pipeline.method.losses import masked_ce, ohem_ce

K = 6


def _logits() -> torch.Tensor:
    """bf16 teacher-like logits: many pixels near the 0.92-0.99 confidences the gates compare."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, K, 48, 48, generator=g) * 2.5
    z[:, 0] += 3.0  # a dominant class, as background is
    return z.bfloat16()


def _ignore() -> torch.Tensor:
    ign = torch.zeros(4, 48, 48, dtype=torch.bool)
    ign[:, :, -6:] = True
    return ign


def _both(fn):
    """fn(logits) in fp32 on the upcast logits, and under CPU bf16 autocast on the bf16 logits."""
    z = _logits()
    ref = fn(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = fn(z)
    return ref, fast


@pytest.mark.parametrize("selection", ["cplg", "fixed"])
def test_cplg_and_fixed_threshold_masks_match_fp32(selection):
    cfg = MethodCfg(selection=selection)
    ref, fast = _both(lambda z: select(pl_prob(z), _ignore(), cfg))
    assert ref[1].any() and not ref[1].all()  # the gate is exercised: some pixels kept, some not
    assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])


def test_adaptive_threshold_state_and_masks_match_fp32():
    def run(z):
        state = AdaptiveThresholds(K, momentum=0.5)
        for _ in range(3):
            state.update(pl_prob(z), ~_ignore())
        return (state.value(), *select(pl_prob(z), _ignore(), MethodCfg(selection="adaptive"), state))

    ref, fast = _both(run)
    assert fast[0].dtype == torch.float32 and torch.equal(ref[0], fast[0])
    assert torch.equal(ref[1], fast[1]) and torch.equal(ref[2], fast[2])


def test_alignment_state_and_masks_match_fp32():
    labels = torch.randint(0, K, (2, 48, 48), generator=torch.Generator().manual_seed(1))

    def run(z):
        align = DistributionAlignment(K, momentum=0.5)
        align.update(pl_prob(z), ~_ignore(), labels)
        return (align.ratio(), *select(pl_prob(z, align), _ignore(), MethodCfg()))

    ref, fast = _both(run)
    assert torch.equal(ref[0], fast[0])
    assert torch.equal(ref[1], fast[1]) and torch.equal(ref[2], fast[2])


def test_ohem_and_masked_ce_match_fp32():
    target = torch.randint(0, K, (4, 48, 48), generator=torch.Generator().manual_seed(2))
    target[:, :3] = 255
    ref, fast = _both(lambda z: ohem_ce(z, target, min_kept=2000, chunk=2))
    assert fast.dtype == torch.float32 and fast.item() == pytest.approx(ref.item(), rel=1e-6)
    keep = torch.rand(4, 48, 48, generator=torch.Generator().manual_seed(3)) < 0.5
    ref, fast = _both(lambda z: masked_ce(z, target, keep, ~_ignore()))
    assert fast.item() == pytest.approx(ref.item(), rel=1e-6)
