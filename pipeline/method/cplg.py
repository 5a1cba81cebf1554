"""Pseudo-label selection: CPLG (class-wise, per image), a fixed threshold, adaptive per-class thresholds.

CPLG as the released code implements it (the paper's Eq. 21 is missing; dssn-method.md §2):
per image n and class j, m[n, j] = max over all H*W pixels of p_j (padding and pasted CutMix
region included); a class with m <= tau_low gives no pseudo-label in that image; otherwise a pixel
whose argmax is j is kept iff p_j > r * m[n, j]. Effective thresholds therefore lie in
(r * tau_low, r], i.e. they can be below tau_low; it is not max(r * m, tau_low).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.method.losses import class_counts


def _drop_ignored(keep: Tensor, ignore: Tensor | None) -> Tensor:
    # `.bool()` so a 0/1 integer map cannot be bit-inverted into -1/-2 by `~`.
    return keep if ignore is None else keep & ~ignore.bool()


def _upcast(prob: Tensor) -> Tensor:
    return prob.float() if prob.dtype in (torch.float16, torch.bfloat16) else prob


def cplg_mask(
    prob: Tensor, r: float = 0.96, tau_low: float = 0.92, ignore: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(labels int64 (N,H,W), keep bool (N,H,W)) from softmax probabilities (N,C,H,W).

    Only the argmax class is tested: with the defaults every usable threshold exceeds 0.5, so this is
    identical to the reference's "count classes above their threshold". Half/bf16 maps (autocast)
    are upcast so the 0.96 * max comparison is not quantised. Fully on-device, no host sync.
    """
    prob = _upcast(prob)
    conf, labels = prob.max(dim=1)  # ties resolve to the lowest class index
    cmax = prob.flatten(2).amax(dim=2)  # (N, C): per image, over every pixel
    # A gated-out class gets +inf, so the strict test below can never pass for it.
    thresh = torch.where(cmax > tau_low, r * cmax, torch.full_like(cmax, float("inf")))
    pix_thresh = thresh.gather(1, labels.flatten(1)).view_as(conf)
    keep = conf > pix_thresh
    return labels, _drop_ignored(keep, ignore)


def fixed_threshold_mask(
    prob: Tensor, threshold: float = 0.95, inclusive: bool = True, ignore: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """UniMatch-style selection; UniMatch keeps a pixel when its max probability is >= threshold."""
    conf, labels = _upcast(prob).max(dim=1)
    keep = conf >= threshold if inclusive else conf > threshold
    return labels, _drop_ignored(keep, ignore)


def keep_ratio_per_class(
    labels: Tensor, keep: Tensor, num_classes: int, valid: Tensor | None = None
) -> Tensor:
    """Per class: kept / predicted pixels (among `valid`), to see which classes CPLG starves.

    NaN where a class is never predicted, so averages over classes can skip it (nanmean).
    """
    valid = torch.ones_like(keep, dtype=torch.bool) if valid is None else valid
    predicted, kept = class_counts(labels, keep, valid, num_classes)
    return torch.where(predicted > 0, kept / predicted.clamp(min=1), torch.full_like(predicted, float("nan")))


def sync_sum(t: Tensor) -> Tensor:
    """Sum over the DDP group in place (identity outside one): pseudo-label state stays identical on every rank."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t


def adaptive_mask(prob: Tensor, thresholds: Tensor, ignore: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-class thresholds (C,): a pixel is kept when its max probability is >= its argmax class's."""
    conf, labels = _upcast(prob).max(dim=1)
    keep = conf >= thresholds.to(conf.dtype)[labels]
    return labels, _drop_ignored(keep, ignore)


class AdaptiveThresholds:
    """Beyond the paper: self-adaptive per-class thresholds (FreeMatch, Wang et al. ICLR'23) for
    segmentation, so a class the teacher is never sure of still gets pseudo-labels.

    State, EMAs over the teacher's valid unlabeled pixels: `g`, the mean max-probability, and
    `c[j]`, the mean max-probability of the pixels predicted as class j (FreeMatch averages p_j
    over every pixel instead, which in segmentation tracks class frequency, not confidence).
    Threshold of class j: g * c[j] / max(c). Both start at 1/C (FreeMatch): few pixels are rejected
    early on and the thresholds rise with the teacher. A class absent from a batch keeps its value.
    Under DDP the batch sums are all-reduced first, so every rank holds the same thresholds.
    """

    def __init__(self, num_classes: int, momentum: float = 0.999, device: torch.device | str = "cpu"):
        self.momentum = momentum
        self.g = torch.full((), 1.0 / num_classes, device=device)
        self.c = torch.full((num_classes,), 1.0 / num_classes, device=device)

    def value(self) -> Tensor:
        return self.g * self.c / self.c.max()

    @torch.no_grad()
    def update(self, prob: Tensor, valid: Tensor) -> None:
        """One EMA step from softmax maps (N, C, H, W) and their valid pixels (N, H, W). No host sync."""
        conf, labels = prob.max(dim=1)
        conf = conf.to(self.c.dtype)
        w = valid.to(conf.dtype).flatten()
        k = self.c.numel()
        sums = torch.cat(
            [
                torch.zeros(k, device=conf.device).index_add_(0, labels.flatten(), conf.flatten() * w),
                torch.zeros(k, device=conf.device).index_add_(0, labels.flatten(), w),
            ]
        )
        sums = sync_sum(sums)
        conf_sum, count = sums[:k], sums[k:]
        m = self.momentum
        seen = count > 0
        self.c = torch.where(seen, m * self.c + (1 - m) * conf_sum / count.clamp(min=1), self.c)
        total = count.sum()
        self.g = torch.where(total > 0, m * self.g + (1 - m) * conf_sum.sum() / total.clamp(min=1), self.g)

    def state_dict(self) -> dict[str, Tensor]:
        return {"g": self.g.cpu(), "c": self.c.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.g, self.c = state["g"].to(self.g.device), state["c"].to(self.c.device)
