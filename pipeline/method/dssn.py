"""The DSSN training step — every view, pseudo-label, loss and weight on one screen.

Defaults reproduce the released VOC code (see ../shared/spec/dssn-method.md §1–§4); every
paper-vs-code difference and every baseline/ablation is a flag of `MethodCfg`, not a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.config import MethodCfg
from pipeline.data.transforms import normalize
from pipeline.method.align import DistributionAlignment
from pipeline.method.cplg import AdaptiveThresholds, adaptive_mask, cplg_mask, fixed_threshold_mask
from pipeline.method.cutmix import paste, sample_boxes
from pipeline.method.losses import consistency_loss, masked_ce, selection_weights
from pipeline.method.strong_aug import strong_augment


@dataclass
class Batch:
    """One iteration's inputs, uint8 images on the device (normalised inside the step)."""

    x: Tensor  # labeled images (B, 3, S, S) uint8
    y: Tensor  # labels (B, S, S) int64, 255 = ignore
    u: Tensor | None = None  # unlabeled weak crops (B, 3, S, S) uint8
    u_ign: Tensor | None = None  # bool, True = crop padding
    m: Tensor | None = None  # second unlabeled batch: the CutMix partner
    m_ign: Tensor | None = None
    u_gt: Tensor | None = None  # ground truth of u and m (255 = ignore): pseudo-label accuracy and
    m_gt: Tensor | None = None  # the `oracle_pseudo_labels` diagnostic only


def select(
    prob: Tensor, ignore: Tensor, cfg: MethodCfg, adaptive: AdaptiveThresholds | None = None
) -> tuple[Tensor, Tensor]:
    if cfg.selection == "cplg":
        return cplg_mask(prob, r=cfg.r, tau_low=cfg.tau_low, ignore=ignore)
    if cfg.selection == "adaptive":
        if adaptive is None:
            raise ValueError("method.selection 'adaptive' needs its AdaptiveThresholds state")
        return adaptive_mask(prob, adaptive.value(), ignore=ignore)
    return fixed_threshold_mask(prob, threshold=cfg.threshold, ignore=ignore)


def pl_prob(logits: Tensor, align: DistributionAlignment | None = None) -> Tensor:
    """Pseudo-label probabilities: softmax in fp32 whatever autocast gives, then aligned.

    CUDA autocast runs softmax in fp32 but CPU autocast keeps bf16, and CPLG's `p > 0.96 * max`
    on 8-bit-mantissa maps keeps other pixels: selection must not depend on the device's autocast."""
    p = logits.float().softmax(1)
    return align.apply(p) if align is not None else p


def dssn_step(
    student: nn.Module,
    teacher: nn.Module | None,
    b: Batch,
    cfg: MethodCfg,
    sup_loss,
    gen: torch.Generator,
    strong_off: bool = False,
    adaptive: AdaptiveThresholds | None = None,
    align: DistributionAlignment | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one iteration and its parts (tensors, no host sync).

    `strong_off`: no strong-view CE this iteration (the early-training rules, `train.early_rules`).
    `adaptive`, `align`: the states of `selection: adaptive` and `pl_align`, updated here."""
    x = normalize(b.x.float() / 255.0)
    if not cfg.use_unlabeled or b.u is None:  # supervised baseline (or warm-up): same model and schedule
        loss_x = sup_loss(student(x), b.y)
        return loss_x, {"loss_x": loss_x.detach()}

    if cfg.pl_align and align is None:
        raise ValueError("method.pl_align needs its DistributionAlignment state")
    if cfg.oracle_pseudo_labels and (b.u_gt is None or b.m_gt is None):
        raise ValueError(
            "method.oracle_pseudo_labels needs the unlabeled ground truth (Batch.u_gt, Batch.m_gt)"
        )

    # Image-level views: two independent photometric draws + their own CutMix boxes.
    u01, m01 = b.u.float() / 255.0, b.m.float() / 255.0
    n, size = u01.shape[0], u01.shape[-1]
    box1 = sample_boxes(n, size, cfg.cutmix_p, generator=gen, device=u01.device)
    box2 = sample_boxes(n, size, cfg.cutmix_p, generator=gen, device=u01.device)
    s1 = paste(strong_augment(u01, gen, cfg.intensity_ops), strong_augment(m01, gen, cfg.intensity_ops), box1)
    s2 = paste(strong_augment(u01, gen, cfg.intensity_ops), strong_augment(m01, gen, cfg.intensity_ops), box2)

    # Student: clean + feature-dropout views of [labeled, weak] in one pass, then both strong views.
    outs = student(
        torch.cat([x, normalize(u01)]), n_fp=cfg.n_fp, fp_p=cfg.fp_dropout, fp_levels=cfg.fp_levels
    )
    clean, fps = (outs[0], [o[len(x) :] for o in outs[1:]]) if cfg.n_fp else (outs, [])
    pred_x, pred_w = clean[: len(x)], clean[len(x) :]
    pred_s1, pred_s2 = student(torch.cat([normalize(s1), normalize(s2)])).chunk(2)

    # Pseudo-labels. Image-level: EMA teacher (UniMatch: the student itself), weak outside the box,
    # partner inside it, selected on the composited map. Feature-level: the student's own weak view.
    with torch.no_grad():
        if teacher is not None:
            logit_w, logit_m = teacher(normalize(u01)), teacher(normalize(m01))
        else:
            student.eval()
            logit_m = student(normalize(m01))
            student.train()
            logit_w = pred_w.detach()
        # Beyond the paper, stateful, each updated from this batch first: distribution alignment of
        # the maps, then adaptive per-class thresholds on the aligned maps.
        prob = lambda z: pl_prob(z, align)  # noqa: E731
        if align is not None or adaptive is not None:
            p_um, valid_um = pl_prob(torch.cat([logit_w, logit_m])), ~torch.cat([b.u_ign, b.m_ign])
            if align is not None:
                align.update(p_um, valid_um, b.y)
            if adaptive is not None:
                adaptive.update(align.apply(p_um) if align is not None else p_um, valid_um)
        ign1, ign2 = paste(b.u_ign, b.m_ign, box1), paste(b.u_ign, b.m_ign, box2)
        t1, keep1 = select(prob(paste(logit_w, logit_m, box1)), ign1, cfg, adaptive)
        t2, keep2 = select(prob(paste(logit_w, logit_m, box2)), ign2, cfg, adaptive)
        tw, keepw = select(prob(pred_w.detach()), b.u_ign, cfg, adaptive)
        if cfg.oracle_pseudo_labels:  # diagnostic upper bound: ground truth, every labeled pixel kept
            t1, t2, tw = paste(b.u_gt, b.m_gt, box1), paste(b.u_gt, b.m_gt, box2), b.u_gt
            keep1, keep2, keepw = t1 != 255, t2 != 255, tw != 255
    valid1, valid2, validw = ~ign1, ~ign2, ~b.u_ign
    w1 = w2 = ww = None
    if cfg.pl_balance == "selection":  # beyond the paper: undo the gate's class skew
        k, cap = pred_x.shape[1], cfg.pl_balance_cap
        w1, w2 = selection_weights(t1, keep1, valid1, k, cap), selection_weights(t2, keep2, valid2, k, cap)
        ww = selection_weights(tw, keepw, validw, k, cap)

    loss_x = sup_loss(pred_x, b.y)
    loss_s = masked_ce(pred_s1, t1, keep1, valid1, w1) + masked_ce(pred_s2, t2, keep2, valid2, w2)
    if strong_off:
        loss_s = loss_s * 0.0
    loss_fp = sum((masked_ce(f, tw, keepw, validw, ww) for f in fps), torch.zeros((), device=x.device))
    zero = torch.zeros((), device=x.device)
    con_img = consistency_loss(pred_s1, pred_s2, cfg.con_mode) if cfg.con_img else zero
    con_feat = consistency_loss(fps[0], fps[1], cfg.con_mode) if cfg.con_feat and len(fps) == 2 else zero

    loss = cfg.global_scale * (
        loss_x + cfg.w_s * loss_s + cfg.w_fp * loss_fp + cfg.w_con * (con_img + con_feat)
    )
    stats = {
        "loss_x": loss_x,
        "loss_s": loss_s,
        "loss_fp": loss_fp,
        "loss_con_img": con_img,
        "loss_con_feat": con_feat,
        "mask_ratio": (keepw & validw).sum() / validw.sum().clamp(min=1),
        # pseudo-label statistics by source: the student's weak view (feature level, loss_fp) ...
        "pl_labels": tw,
        "pl_keep": keepw & validw,
        # ... and the teacher's composited maps (image level, the strong views' targets, loss_s)
        "plt_labels": torch.cat([t1, t2]),
        "plt_keep": torch.cat([keep1 & valid1, keep2 & valid2]),
        "plt_valid": torch.cat([valid1, valid2]),
    }
    if b.u_gt is not None and b.m_gt is not None:
        stats["plt_gt"] = torch.cat([paste(b.u_gt, b.m_gt, box1), paste(b.u_gt, b.m_gt, box2)])
    return loss, {k: v.detach() for k, v in stats.items()}
