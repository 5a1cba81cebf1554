"""Beyond the paper: distribution alignment of the pseudo-label maps (ReMixMatch, Berthelot et al.
ICLR'20), so a class the teacher under-predicts can still win a pixel's argmax.

A threshold, fixed or adaptive, only filters the teacher's argmax; a class that never is the argmax
(cross on the embedded set) never gets a pseudo-label. Alignment rescales every class's
probability by (labeled class frequency) / (teacher's mean predicted probability), both EMAs, and
renormalises; under-predicted classes gain, over-predicted ones lose.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.method.cplg import sync_sum


class DistributionAlignment:
    """EMAs (start 1/C) of the labeled pixels' class frequencies and of the teacher's mean softmax
    over valid unlabeled pixels; DDP ranks all-reduce the batch sums, so they share one state."""

    def __init__(self, num_classes: int, momentum: float = 0.999, device: torch.device | str = "cpu"):
        self.momentum = momentum
        self.prior = torch.full((num_classes,), 1.0 / num_classes, device=device)
        self.pred = torch.full((num_classes,), 1.0 / num_classes, device=device)

    @torch.no_grad()
    def update(self, prob: Tensor, valid: Tensor, labels: Tensor, ignore_index: int = 255) -> None:
        """One EMA step from the teacher's maps (N, C, H, W), their valid pixels and the labeled batch's
        labels (B, H, W). No host sync; a side with no pixel keeps its value."""
        k = self.prior.numel()
        w = valid.to(self.pred.dtype)
        lab = labels.flatten()
        known = lab != ignore_index
        sums = torch.cat(
            [
                (prob.to(self.pred.dtype) * w[:, None]).sum(dim=(0, 2, 3)),
                w.sum()[None],
                torch.zeros(k, device=lab.device).index_add_(
                    0, lab.clamp(max=k - 1), known.to(self.prior.dtype)
                ),
            ]
        )
        sums = sync_sum(sums)
        pred_sum, n_pred, lab_count = sums[:k], sums[k], sums[k + 1 :]
        m = self.momentum
        self.pred = torch.where(
            n_pred > 0, m * self.pred + (1 - m) * pred_sum / n_pred.clamp(min=1), self.pred
        )
        n_lab = lab_count.sum()
        self.prior = torch.where(
            n_lab > 0, m * self.prior + (1 - m) * lab_count / n_lab.clamp(min=1), self.prior
        )

    def ratio(self) -> Tensor:
        """Per-class multiplier (C,): labeled frequency / teacher's mean probability."""
        return self.prior / self.pred.clamp(min=1e-6)

    def apply(self, prob: Tensor) -> Tensor:
        """Aligned, renormalised probabilities (N, C, H, W)."""
        q = prob * self.ratio().to(prob.dtype)[None, :, None, None]
        return q / q.sum(dim=1, keepdim=True).clamp(min=1e-12)

    def state_dict(self) -> dict[str, Tensor]:
        return {"prior": self.prior.cpu(), "pred": self.pred.cpu()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.prior, self.pred = state["prior"].to(self.prior.device), state["pred"].to(self.pred.device)
