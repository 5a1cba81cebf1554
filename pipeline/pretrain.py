"""Warm start for the embedded benchmark: a backbone pretrained on a disjoint synthetic set.

The paper's backbones start from ImageNet classification weights, and pseudo-labels only help
a model that already sees objects (../shared/spec/calibration.md: from scratch, DSSN loses to
supervised on the embedded set). The analogue built here is ImageNet's recipe in miniature:
image-level multi-label classification ("which shapes are in this image?") on images drawn
from *another generator seed* — no pixel label and no image of the benchmark is ever seen —
at the usual classification stride 32. The result is a torchvision ResNet state_dict (with its
`fc`), loaded through the same key-checked path as the real weights (`model.pretrained`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pipeline.config import ModelCfg, PretrainCfg, to_dict
from pipeline.data.synthetic import CLASSES, IGNORE, render
from pipeline.data.transforms import normalize
from pipeline.io import atomic, write_json
from pipeline.model import build_backbone


@dataclass(frozen=True)
class ShapeSet:
    """Rendered images (N, 3, H, W) uint8 and their image-level targets (N, n_shapes) float."""

    images: torch.Tensor
    targets: torch.Tensor


def render_set(seed: int, split: str, n: int, size: int, desc: str) -> ShapeSet:
    """Images of generator `seed` with multi-hot targets: a shape counts when any pixel shows it."""
    n_shapes = len(CLASSES) - 1
    images = np.empty((n, size, size, 3), np.uint8)
    targets = np.zeros((n, n_shapes), np.float32)
    for i in tqdm(range(n), desc=desc, unit="img", mininterval=2):
        img, label = render(seed, split, i, size)
        images[i] = img
        present = np.unique(label[(label > 0) & (label != IGNORE)])
        targets[i, present - 1] = 1.0
    return ShapeSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(targets))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Flips and 90-degree turns: label-preserving for shapes, cheap, drawn per batch."""
    k = int(torch.randint(0, 4, (), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    return x.flip(3) if torch.rand((), generator=gen) < 0.5 else x


def classifier(cfg: PretrainCfg) -> nn.Module:
    """The segmentation backbone's trunk at stride 32 with a multi-label `fc` on global pooling."""
    # Trained at stride 32 as ImageNet weights are; dilation leaves the weights' shapes unchanged,
    # so the state_dict loads into the dilated segmentation trunk.
    cfg_m = ModelCfg(backbone=cfg.backbone, deep_stem=cfg.deep_stem)
    net, _, c4 = build_backbone(cfg_m, dilated=False)
    net.fc = nn.Linear(c4, len(CLASSES) - 1)
    return net


@torch.no_grad()
def multilabel_scores(net: nn.Module, data: ShapeSet, batch: int = 256) -> dict[str, float]:
    """Per-label accuracy and exact-set accuracy at probability 0.5."""
    net.eval()
    preds = torch.cat(
        [
            net(normalize(data.images[i : i + batch].float() / 255.0)) > 0
            for i in range(0, len(data.images), batch)
        ]
    )
    net.train()
    hit = preds == data.targets.bool()
    return {"label_accuracy": hit.float().mean().item(), "exact_accuracy": hit.all(1).float().mean().item()}


def config_hash(cfg: PretrainCfg) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:12]


def pretrain(cfg: PretrainCfg, out_file: Path, progress: bool = True) -> dict[str, Any]:
    """Train the classifier and write its state_dict to `out_file` (+ `<out>.json`), atomically."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(cfg.flush_denormal)
    train = render_set(cfg.seed, "train", cfg.n_images, cfg.size, f"pretrain images (seed {cfg.seed})")
    held = render_set(cfg.seed, "val", cfg.n_val, cfg.size, "held-out images")
    net = classifier(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step", mininterval=5, disable=not progress)
    running = None
    for step in bar:
        idx = torch.randint(0, cfg.n_images, (cfg.batch,), generator=gen)
        x = normalize(_augment(train.images[idx], gen).float() / 255.0)
        loss = F.binary_cross_entropy_with_logits(net(x), train.targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{running:.3f}")
    scores = multilabel_scores(net, held)
    meta = {
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "steps": cfg.steps,
        "final_train_loss": running,
        "held_out": scores,
        "seconds": round(time.time() - t0, 1),
        "pretext": "multi-label shape classification, image-level targets, generator seed "
        f"{cfg.seed} (disjoint from the benchmark's images)",
    }
    state = net.state_dict()
    atomic(out_file, lambda p: torch.save(state, p))
    write_json(out_file.with_suffix(".json"), meta)
    return meta
