"""The loss terms of the DSSN step (dssn-method.md §3, §6.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def masked_ce(logits: Tensor, target: Tensor, keep: Tensor, valid: Tensor) -> Tensor:
    """Sum of CE over kept & valid pixels / number of valid pixels (rejected pixels still dilute it)."""
    safe = target.masked_fill(~valid | (target >= logits.shape[1]) | (target < 0), 0)
    ce = F.cross_entropy(logits.float(), safe, reduction="none")
    n_valid = valid.sum()
    return (ce * (keep & valid)).sum() / n_valid.clamp(min=1)


def supervised_ce(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def ohem_ce(
    logits: Tensor, target: Tensor, thresh: float = 0.7, min_kept: int = 100_000, ignore_index: int = 255
) -> Tensor:
    """Online hard example mining CE (CPS/TorchSemiSeg rule): train on the hardest pixels.

    Among valid pixels take the softmax probability of the ground-truth class. With more than
    `min_kept` valid pixels, the threshold is max(thresh, min_kept-th smallest probability) and
    only pixels at or below it are kept; otherwise every valid pixel is kept.
    """
    valid = target != ignore_index
    n_valid = int(valid.sum())
    target = target.clone()
    if min_kept < n_valid and n_valid > 0:
        prob = logits.float().softmax(1)
        gt_prob = prob.gather(1, target.masked_fill(~valid, 0).unsqueeze(1)).squeeze(1)
        gt_prob = gt_prob.masked_fill(~valid, 1.0)
        kth = (
            gt_prob[valid].flatten().kthvalue(max(min_kept, 1)).values
            if min_kept > 0
            else gt_prob.new_tensor(0)
        )
        threshold = torch.maximum(kth, gt_prob.new_tensor(thresh))
        target[valid & (gt_prob > threshold)] = ignore_index
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def zscore(logits: Tensor, dim: int = 1) -> Tensor:
    """Standardise each pixel's logit vector across classes (unbiased std, as the code does)."""
    return (logits - logits.mean(dim=dim, keepdim=True)) / logits.std(dim=dim, keepdim=True)


def consistency_loss(a: Tensor, b: Tensor, mode: str = "zscore_mse") -> Tensor:
    """The paper's "contrastive" term between two views' logits; gradients flow to both."""
    a, b = a.float(), b.float()
    if mode == "zscore_mse":  # the released code
        return F.mse_loss(zscore(a), zscore(b))
    if mode == "raw_l2":  # the paper: squared L2 over classes / (W*H), batch-averaged
        return ((a - b) ** 2).sum(dim=1).mean()
    raise ValueError(f"method.con_mode must be 'zscore_mse' or 'raw_l2', got {mode!r}")
