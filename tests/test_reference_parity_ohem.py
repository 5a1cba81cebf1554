"""OHEM parity: `losses.ohem_ce` against the reference `util/ohem.py` on identical inputs.

Value and gradient, with ignore pixels, in every branch of the reference: #valid below min_kept
(keep all), above it with the threshold staying at `thresh` or raised to the min_kept-th smallest
probability, #valid equal to min_kept, and min_kept 0 (the reference then trains on every valid pixel).
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import TrainCfg
from pipeline.method.losses import ohem_ce
from pipeline.train import supervised_loss
from tests.reference import reference_modules


@pytest.fixture(scope="module")
def ref_ohem():
    with reference_modules("util.ohem") as (mod,):
        yield mod.ProbOhemCrossEntropy2d


def _inputs(
    seed: int, n: int = 2, c: int = 19, h: int = 12, w: int = 16, sharp: float = 1.0, ign: float = 0.2
):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, c, (n, h, w), generator=g)
    logits = torch.randn(n, c, h, w, generator=g)
    # `sharp` > 0 pushes most pixels towards their target: GT probabilities spread over (0, 1)
    logits = logits + sharp * torch.rand(n, 1, h, w, generator=g) * 6 * torch.nn.functional.one_hot(
        target, c
    ).permute(0, 3, 1, 2)
    target[torch.rand(n, h, w, generator=g) < ign] = 255
    return logits, target


def _value_and_grad(fn, logits, target):
    lg = logits.clone().requires_grad_(True)
    out = fn(lg, target.clone())
    out.backward()
    return out.detach(), lg.grad


def _gt_prob(logits, target):
    valid = target != 255
    p = logits.softmax(1).gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
    return p[valid]


CASES = {
    # name: (seed, sharp, thresh, min_kept)
    "valid_below_min_kept": (0, 1.0, 0.7, 10_000),
    "threshold_stays_thresh": (1, 0.0, 0.7, 50),  # flat logits: k-th smallest prob << 0.7
    "threshold_raised_to_kth": (2, 1.5, 0.7, 250),  # k-th smallest prob > 0.7
    "low_thresh_raised_to_kth": (3, 1.5, 0.5, 150),
    "min_kept_zero": (4, 1.5, 0.7, 0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ohem_matches_reference(ref_ohem, case):
    seed, sharp, thresh, min_kept = CASES[case]
    logits, target = _inputs(seed, sharp=sharp)
    probs = _gt_prob(logits, target)
    n_valid = probs.numel()
    # the case really exercises the branch its name says
    if case == "valid_below_min_kept":
        assert n_valid < min_kept
    elif case == "threshold_stays_thresh":
        assert n_valid > min_kept and probs.sort().values[min_kept - 1] < thresh
    elif case in ("threshold_raised_to_kth", "low_thresh_raised_to_kth"):
        assert n_valid > min_kept and probs.sort().values[min_kept - 1] > thresh
    else:
        assert (probs > thresh).any()  # a threshold would drop pixels; the reference keeps them
    ref = ref_ohem(ignore_index=255, thresh=thresh, min_kept=min_kept)
    v_ref, g_ref = _value_and_grad(ref, logits, target)
    v_ours, g_ours = _value_and_grad(
        lambda lg, t: ohem_ce(lg, t, thresh=thresh, min_kept=min_kept), logits, target
    )
    assert torch.allclose(v_ours, v_ref, rtol=1e-5, atol=1e-7), (v_ours, v_ref)
    assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-8)


def test_ohem_matches_reference_when_valid_equals_min_kept(ref_ohem):
    logits, target = _inputs(5, sharp=1.5)
    n_valid = int((target != 255).sum())
    ref = ref_ohem(ignore_index=255, thresh=0.7, min_kept=n_valid)
    v_ref, g_ref = _value_and_grad(ref, logits, target)
    v_ours, g_ours = _value_and_grad(lambda lg, t: ohem_ce(lg, t, 0.7, n_valid), logits, target)
    assert torch.allclose(v_ours, v_ref, rtol=1e-5) and torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-8)


def test_ohem_all_ignored_is_zero_where_the_reference_gives_nan(ref_ohem):
    """Deliberate difference: a crop with no valid pixel gives 0 (with a graph), not NaN."""
    logits, _ = _inputs(6)
    target = torch.full((2, 12, 16), 255)
    ref = ref_ohem(ignore_index=255, thresh=0.7, min_kept=10)(logits, target.clone())
    assert torch.isnan(ref)
    assert ohem_ce(logits, target, 0.7, 10).item() == 0.0


@pytest.mark.parametrize(
    "n,chunk,min_kept",
    [(4, 1, 100), (4, 2, 200), (6, 3, 250)],
    ids=["R101-8x1-like", "R50-4x2-like", "chunk3"],
)
def test_chunked_ohem_is_the_mean_of_the_reference_per_chunk(ref_ohem, n, chunk, min_kept):
    """The reference: one OHEM call per GPU batch, gradients averaged over GPUs by DDP."""
    logits, target = _inputs(7, n=n, sharp=1.5)
    logits = logits * torch.linspace(0.5, 3.0, n).view(n, 1, 1, 1)  # easy and hard images in one batch

    def reference(lg, t):
        crit = ref_ohem(ignore_index=255, thresh=0.7, min_kept=min_kept)
        return torch.stack([crit(a, b) for a, b in zip(lg.split(chunk), t.split(chunk), strict=True)]).mean()

    cfg = TrainCfg(batch_l=n, sup_loss="ohem", ohem_min_kept=min_kept, ohem_chunk=chunk)
    v_ref, g_ref = _value_and_grad(reference, logits, target)
    v_ours, g_ours = _value_and_grad(supervised_loss(cfg), logits, target)
    assert torch.allclose(v_ours, v_ref, rtol=1e-5) and torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-8)
    # pooling the batch into one call (min_kept scaled by the number of chunks) is another loss
    pooled = ohem_ce(logits, target, 0.7, min_kept * n // chunk)
    assert not torch.allclose(pooled, v_ref, rtol=1e-3)
