"""The loss terms of the DSSN step (dssn-method.md §3, §6.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CONSISTENCY_MODES = ("zscore_mse", "raw_l2")


def masked_ce(
    logits: Tensor, target: Tensor, keep: Tensor, valid: Tensor, weight: Tensor | None = None
) -> Tensor:
    """Sum of CE over kept & valid pixels / number of valid pixels (spec §3).

    The reference divides by the valid count, not the kept count, so rejected pixels still dilute
    the loss. Targets outside [0, C) (e.g. 255 padding) are replaced before CE and never counted
    in the numerator. No valid pixel -> 0 that still carries a graph. `weight`: per-pixel factors
    on the CE (see `selection_weights`).
    """
    num_classes = logits.shape[1]
    valid = valid.bool()
    in_range = (target >= 0) & (target < num_classes)
    safe = torch.where(in_range, target, torch.zeros_like(target))
    ce = F.cross_entropy(logits.float(), safe, reduction="none")
    used = keep.bool() & valid & in_range
    if weight is not None:
        ce = ce * weight
    # where(), not multiply: a non-finite CE at an unused pixel must not turn the sum into NaN.
    total = torch.where(used, ce, torch.zeros_like(ce)).sum()
    return total / valid.sum().clamp(min=1)


def class_counts(labels: Tensor, keep: Tensor, valid: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per class: valid pixels labelled with it, and those of them kept (index_add: no host sync).

    Labels outside [0, C) (255 where the oracle diagnostic's ground truth is ignored) count nowhere.
    """
    inside = valid.bool() & (labels >= 0) & (labels < num_classes)
    flat = torch.where(inside, labels, torch.zeros_like(labels)).flatten()
    zeros = torch.zeros(num_classes, device=labels.device)
    pred = zeros.index_add(0, flat, inside.flatten().float())
    kept = zeros.index_add(0, flat, (inside & keep.bool()).flatten().float())
    return pred, kept


def selection_weights(labels: Tensor, keep: Tensor, valid: Tensor, num_classes: int, cap: float) -> Tensor:
    """Per-pixel weights that undo a selection's class skew (beyond the paper).

    A confidence gate keeps most of the frequent classes' pixels and few of the rare ones', so the
    unlabeled loss teaches a shifted class prior. Class c's kept pixels are weighted by
    (c's share of the teacher's predictions) / (c's share of the kept pixels), at most `cap`, then
    all weights are scaled so the kept pixels' weights sum to their count (the loss keeps its size).
    Counted over the whole batch; no host sync.
    """
    pred, kept = class_counts(labels, keep, valid, num_classes)
    safe = torch.where((labels >= 0) & (labels < num_classes), labels, torch.zeros_like(labels))
    zeros = torch.zeros_like(pred)
    share_pred = pred / pred.sum().clamp(min=1)
    share_kept = kept / kept.sum().clamp(min=1)
    ratio = torch.where(kept > 0, share_pred / share_kept.clamp(min=1e-12), zeros).clamp(max=cap)
    ratio = ratio * kept.sum() / (ratio * kept).sum().clamp(min=1e-12)
    return ratio[safe]


def supervised_ce(logits: Tensor, target: Tensor, ignore_index: int = 255) -> Tensor:
    """Mean CE over non-ignored pixels; 0 (with a graph) instead of NaN when every pixel is ignored."""
    ce_sum = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    return ce_sum / (target != ignore_index).sum().clamp(min=1)


def ohem_ce(
    logits: Tensor,
    target: Tensor,
    thresh: float = 0.7,
    min_kept: int = 100_000,
    ignore_index: int = 255,
    chunk: int | None = None,
) -> Tensor:
    """Online hard example mining CE (CPS/TorchSemiSeg rule, spec §6.3): train on the hardest pixels.

    Among valid pixels take the softmax probability of the ground-truth class. If #valid < min_kept
    every valid pixel is kept; otherwise threshold = max(thresh, min_kept-th smallest probability)
    and pixels with probability <= threshold are kept. Then a plain mean CE over the kept pixels.
    min_kept <= 0 keeps every valid pixel, as the reference does (its threshold sits under
    `if min_kept > 0`).

    `chunk`: images per OHEM call. The reference runs OHEM on each GPU's own batch (Cityscapes:
    1 image at 8 GPUs x 1, 2 at 4 x 2) and DDP averages the GPUs' gradients, i.e. the loss is the
    mean over chunks of each chunk's OHEM mean; `chunk` reproduces that on one device. None: one
    call over the whole batch. A chunk without a valid pixel contributes 0 (the reference: NaN).

    Written without a host sync: invalid pixels get probability 1 (as in the reference), so the
    k-th smallest over all pixels (k = min(min_kept, #pixels)) equals the k-th smallest valid one
    when #valid >= min_kept, and is >= every valid probability otherwise (= keep all valid).
    """
    n = logits.shape[0]
    per = n if chunk is None else chunk
    if per < 1 or n % per:
        raise ValueError(f"ohem_ce: a batch of {n} images does not split into chunks of {chunk}")
    valid = target != ignore_index
    with torch.no_grad():
        prob = logits.detach().float().softmax(1)
        safe = torch.where(valid, target, torch.zeros_like(target))
        gt_prob = prob.gather(1, safe.unsqueeze(1)).squeeze(1).masked_fill(~valid, 1.0)
        gt_prob, kept = gt_prob.reshape(n // per, -1), valid.reshape(n // per, -1)  # one row per chunk
        if min_kept > 0:
            k = min(min_kept, gt_prob.shape[1])
            threshold = torch.clamp(gt_prob.kthvalue(k, dim=1, keepdim=True).values, min=thresh)
            kept = kept & (gt_prob <= threshold)
        # else: the reference mines only with min_kept > 0, otherwise every valid pixel (plain CE)
    ce = F.cross_entropy(logits.float(), safe, reduction="none").reshape(n // per, -1)
    per_chunk = torch.where(kept, ce, torch.zeros_like(ce)).sum(1) / kept.sum(1).clamp(min=1)
    return per_chunk.mean()


def zscore(logits: Tensor, dim: int = 1) -> Tensor:
    """Standardise each pixel's logit vector across classes; unbiased std, no epsilon, as the code."""
    return (logits - logits.mean(dim=dim, keepdim=True)) / logits.std(dim=dim, keepdim=True)


def consistency_loss(a: Tensor, b: Tensor, mode: str = "zscore_mse") -> Tensor:
    """The paper's "contrastive" term between two views' logits; gradients flow to both (no stop-grad).

    "zscore_mse" (released code): mean over N*C*H*W of (z(a) - z(b))^2.
    "raw_l2" (paper): per pixel squared L2 over classes, summed over pixels / (W*H), batch mean.
    """
    if mode not in CONSISTENCY_MODES:
        raise ValueError(f"unknown consistency mode {mode!r}; expected one of {CONSISTENCY_MODES}")
    a, b = a.float(), b.float()
    if mode == "zscore_mse":
        return (zscore(a) - zscore(b)).pow(2).mean()
    return (a - b).pow(2).sum(dim=1).mean()
