"""Pseudo-label selection: CPLG (class-wise, per image) and a fixed confidence threshold.

CPLG as the released code implements it (the paper's Eq. 21 is missing; dssn-method.md §2):
per image and class j, m_j = max over all pixels of p_j; a class with m_j <= tau_low gives no
pseudo-label in that image; otherwise a pixel whose argmax is j is kept iff p_j > r * m_j.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cplg_mask(
    prob: Tensor, r: float = 0.96, tau_low: float = 0.92, ignore: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(labels int64 (N,H,W), keep bool (N,H,W)) from softmax probabilities (N,C,H,W)."""
    conf, labels = prob.max(dim=1)
    cmax = prob.flatten(2).amax(dim=2)  # (N, C): per image, over every pixel (padding included)
    thresh = torch.where(cmax > tau_low, r * cmax, torch.full_like(cmax, float("inf")))
    keep = conf > thresh.gather(1, labels.flatten(1)).view_as(conf)
    if ignore is not None:
        keep &= ~ignore
    return labels, keep


def fixed_threshold_mask(
    prob: Tensor, threshold: float = 0.95, inclusive: bool = True, ignore: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """UniMatch-style selection: keep a pixel when its max probability reaches `threshold` (>=)."""
    conf, labels = prob.max(dim=1)
    keep = conf >= threshold if inclusive else conf > threshold
    if ignore is not None:
        keep &= ~ignore
    return labels, keep


def keep_ratio_per_class(
    labels: Tensor, keep: Tensor, num_classes: int, valid: Tensor | None = None
) -> Tensor:
    """Per class: kept pixels / pixels predicted as that class (NaN where a class is never predicted)."""
    valid = torch.ones_like(keep) if valid is None else valid
    flat = labels.flatten()
    pred = torch.zeros(num_classes, device=labels.device).index_add_(0, flat, valid.flatten().float())
    kept = torch.zeros(num_classes, device=labels.device).index_add_(
        0, flat, (keep & valid).flatten().float()
    )
    return torch.where(pred > 0, kept / pred.clamp(min=1), torch.full_like(pred, float("nan")))
