"""mIoU as the literature computes it: intersections and unions summed over the whole set."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from pipeline.data.transforms import normalize


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """(K, K) counts, rows = ground truth, columns = prediction; ignore pixels skipped."""
    valid = target != ignore_index
    idx = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def iou_from_confusion(cm: torch.Tensor) -> torch.Tensor:
    """Per-class IoU in percent: I / (U + 1e-10) x 100, as the reference code does."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    return inter / (union + 1e-10) * 100.0


def background_only_miou(cm: torch.Tensor) -> float:
    """mIoU of a model that predicts background (class 0) everywhere, on the same pixels as `cm`:
    the floor a segmentation result has to clear (class imbalance makes it far from 0)."""
    floor = torch.zeros_like(cm)
    floor[:, 0] = cm.sum(1)
    return float(iou_from_confusion(floor).mean())


@torch.no_grad()
def sliding_window_logits(
    model: torch.nn.Module, x: torch.Tensor, num_classes: int, crop: int
) -> torch.Tensor:
    """Sum of softmax over windows of `crop` with stride int(2/3 crop), border windows truncated.

    As the reference: a window starts at every multiple of the stride below the image size, also
    after a window has reached the border (e.g. rows 0, 66, 132 and 198 of a 200-row image at crop
    100), so border pixels get those extra, narrower windows' votes too.
    """
    n, _, h, w = x.shape
    stride = int(crop * 2 / 3)
    out = torch.zeros(n, num_classes, h, w, device=x.device)
    for top in range(0, h, stride):
        for left in range(0, w, stride):
            win = x[:, :, top : top + crop, left : left + crop]
            out[:, :, top : top + crop, left : left + crop] += model(win).float().softmax(dim=1)
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict],
    num_classes: int,
    device: torch.device,
    mode: str = "whole",
    crop: int = 0,
    autocast: bool = False,
) -> dict:
    """Evaluate in eval mode; returns mIoU, per-class IoU and the confusion matrix."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for batch in loader:
        x = normalize(batch["image"].to(device, non_blocking=True).float() / 255.0)
        y = batch["mask"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = sliding_window_logits(model, x, num_classes, crop) if mode == "sliding" else model(x)
        if logits.shape[-2:] != y.shape[-2:]:
            logits = F.interpolate(logits.float(), size=y.shape[-2:], mode="bilinear", align_corners=True)
        cm += confusion_matrix(logits.argmax(1), y, num_classes)
    model.train(was_training)
    iou = iou_from_confusion(cm)
    return {"miou": float(iou.mean()), "iou": iou.tolist(), "confusion": cm}
