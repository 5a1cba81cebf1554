"""The training loop: loaders, poly LR, EMA teacher, evaluation, checkpoint/resume.

Knows nothing about Ray, MLflow or DVC: `fit` reports each epoch through a callback, which
the orchestrator turns into Tune reports, MLflow metrics and checkpoints.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from pipeline.config import DatasetCfg, MethodCfg, ModelCfg, TrainCfg, build, to_dict
from pipeline.data.datasets import SegList
from pipeline.evaluate import evaluate
from pipeline.method.dssn import Batch, dssn_step
from pipeline.method.ema import ema_update, make_teacher
from pipeline.method.losses import ohem_ce, supervised_ce
from pipeline.model import build_model


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial (one table cell and seed) needs; plain data so Ray can ship it."""

    study: str
    cell: str
    dataset_name: str
    dataset: DatasetCfg
    class_names: list[str]
    root: str  # absolute path of the prepared dataset
    split_dir: str  # absolute path of data/splits/<dataset>
    split: str
    protocol: str
    variant: str
    seed: int
    model: ModelCfg
    train: TrainCfg
    method: MethodCfg

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> TrialSpec:
        return build(TrialSpec, d, "trial")


EpochCallback = Callable[[int, dict[str, float], dict[str, Any]], None]


def pick_device(cfg: TrainCfg) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _loader(ds: SegList, batch: int, seed: int, cfg: TrainCfg, device: torch.device) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch, sampler=RandomSampler(ds, generator=g), drop_last=True,
                      num_workers=cfg.workers, pin_memory=device.type == "cuda",
                      persistent_workers=cfg.workers > 0, generator=g)


def _cycle(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _Accum:
    """Sums tensors on the device; one host sync per epoch instead of one per step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.n += 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.n, 1) for k, v in self.sums.items()}


def fit(spec: TrialSpec, on_epoch: EpochCallback | None = None, resume: dict | None = None) -> dict[str, Any]:
    """Train one trial; returns the final summary. `resume` is a state from a previous `on_epoch`."""
    t0 = time.time()
    cfg, mcfg = spec.train, spec.method
    device = pick_device(cfg)
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    k = spec.dataset.num_classes

    root, split_dir = Path(spec.root), Path(spec.split_dir)
    unl = SegList(root, split_dir / spec.split / "unlabeled.txt", "train_u", cfg.crop)
    lab = SegList(root, split_dir / spec.split / "labeled.txt", "train_l", cfg.crop, length=len(unl))
    val = SegList(root, split_dir / "val.txt", "val")
    iters = cfg.iters_per_epoch or len(unl) // cfg.batch_u
    total = iters * cfg.epochs

    student = build_model(spec.model, k).to(device)
    teacher = make_teacher(student) if (mcfg.use_unlabeled and mcfg.teacher) else None
    if device.type == "cuda" and cfg.channels_last:
        student = student.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(student.param_groups(cfg.lr, cfg.head_lr_mult), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, foreach=True)
    else:
        opt = torch.optim.AdamW(student.param_groups(cfg.lr, cfg.head_lr_mult), lr=cfg.lr,
                                weight_decay=cfg.weight_decay, foreach=True)
    if cfg.sup_loss == "ohem":
        def sup_loss(logits, y):
            return ohem_ce(logits, y, thresh=cfg.ohem_thresh, min_kept=cfg.ohem_min_kept)
    else:
        sup_loss = supervised_ce
    step_model = student
    if cfg.compile and device.type == "cuda":
        try:
            step_model = torch.compile(student)
        except Exception as e:  # noqa: BLE001 - any compile failure falls back to eager
            print(f"torch.compile failed ({e}); training eagerly")

    state = {"epoch": 0, "iteration": 0, "history": [], "best": {}}
    if resume is not None:
        student.load_state_dict(resume["student"])
        if teacher is not None and resume.get("teacher") is not None:
            teacher.load_state_dict(resume["teacher"])
        opt.load_state_dict(resume["optimizer"])
        state = {k_: resume[k_] for k_ in ("epoch", "iteration", "history", "best")}

    val_loader = DataLoader(val, batch_size=cfg.eval_batch, shuffle=False, num_workers=cfg.workers)
    gen = torch.Generator(device=device.type if device.type == "cuda" else "cpu")
    autocast = device.type == "cuda" and cfg.amp
    metrics: dict[str, float] = {}

    for epoch in range(state["epoch"], cfg.epochs):
        gen.manual_seed(spec.seed * 100_003 + epoch)
        it_l = _cycle(_loader(lab, cfg.batch_l, spec.seed * 1000 + epoch, cfg, device))
        it_u = _cycle(_loader(unl, cfg.batch_u, spec.seed * 1000 + epoch + 1, cfg, device)) if mcfg.use_unlabeled else None
        it_m = _cycle(_loader(unl, cfg.batch_u, spec.seed * 1000 + epoch + 7, cfg, device)) if mcfg.use_unlabeled else None
        student.train()
        if teacher is not None:
            teacher.train(epoch == 0)  # reference quirk: train-mode BN in epoch 0, eval mode afterwards
        acc = _Accum()
        pl_kept = torch.zeros(k, device=device)
        pl_pred = torch.zeros(k, device=device)
        pl_correct = torch.zeros((), device=device)
        for _ in range(iters):
            bl = _to(next(it_l), device)
            b = Batch(x=bl["image"], y=bl["mask"])
            bu = None
            if mcfg.use_unlabeled:
                bu, bm = _to(next(it_u), device), _to(next(it_m), device)
                b = dataclasses.replace(b, u=bu["image"], u_ign=bu["ignore"], m=bm["image"], m_ign=bm["ignore"])
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, stats = dssn_step(step_model, teacher, b, mcfg, sup_loss, gen,
                                        first_iter=state["iteration"] == 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["iteration"] += 1
            lr_scale = (1 - state["iteration"] / total) ** cfg.poly_power if state["iteration"] < total else 0.0
            for g in opt.param_groups:
                g["lr"] = g["lr0"] * lr_scale
            if teacher is not None:
                ema_update(teacher, student, 0.0 if state["iteration"] == 1 else mcfg.ema_keep)
            labels, keep = stats.pop("pl_labels", None), stats.pop("pl_keep", None)
            if labels is not None and bu is not None:
                pl_pred += torch.bincount(labels[~bu["ignore"]], minlength=k)[:k]
                pl_kept += torch.bincount(labels[keep], minlength=k)[:k]
                pl_correct += (labels[keep] == bu["gt"][keep]).sum()
            acc.add({"loss": loss.detach(), **stats})

        epoch_metrics = {f"train/{k_}": v for k_, v in acc.means().items()}
        epoch_metrics["train/lr"] = opt.param_groups[0]["lr"]
        if mcfg.use_unlabeled:
            kept = pl_kept.sum().item()
            epoch_metrics["train/pl_accuracy"] = pl_correct.item() / kept if kept else float("nan")
            for c, name in enumerate(spec.class_names):
                p = pl_pred[c].item()
                epoch_metrics[f"pseudo_kept/{name}"] = pl_kept[c].item() / p if p else float("nan")
        state["epoch"] = epoch + 1
        last = epoch + 1 == cfg.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            for who, model in (("student", student), ("teacher", teacher)):
                if model is None:
                    continue
                ev = evaluate(model, val_loader, k, device, spec.dataset.eval_mode, cfg.crop, autocast)
                epoch_metrics[f"val/miou_{who}"] = ev["miou"]
                for name, v in zip(spec.class_names, ev["iou"], strict=True):
                    epoch_metrics[f"val_class_{who}/{name}"] = v
                best = state["best"].get(who)
                if best is None or ev["miou"] > best["miou"]:
                    state["best"][who] = {"miou": ev["miou"], "epoch": epoch + 1}
                state.setdefault("last_eval", {})[who] = {"miou": ev["miou"], "iou": ev["iou"],
                                                          "confusion": ev["confusion"].tolist()}
        epoch_metrics["epoch"] = epoch + 1
        state["history"].append({k_: v for k_, v in epoch_metrics.items() if not k_.startswith("val_class")})
        metrics = epoch_metrics
        if on_epoch is not None:
            ckpt = {"student": student.state_dict(), "teacher": teacher.state_dict() if teacher is not None else None,
                    "optimizer": opt.state_dict(), **state, "spec": spec.to_dict()}
            on_epoch(epoch + 1, epoch_metrics, ckpt)

    summary = summarize(state, spec, metrics)
    summary["final/train_seconds"] = time.time() - t0
    summary["final/steps"] = state["iteration"]
    summary["_student"] = student
    return summary


def summarize(state: dict, spec: TrialSpec, last_metrics: dict[str, float]) -> dict[str, Any]:
    """Last- and best-epoch mIoU of student and teacher; `final/miou_best` = the paper's selection."""
    out: dict[str, Any] = {"final/epochs": state["epoch"]}
    bests = []
    for who in ("student", "teacher"):
        if who in state["best"]:
            out[f"final/miou_{who}_last"] = state["last_eval"][who]["miou"]
            out[f"final/miou_{who}_best"] = state["best"][who]["miou"]
            out[f"final/best_epoch_{who}"] = state["best"][who]["epoch"]
            bests.append(state["best"][who]["miou"])
    if bests:
        out["final/miou_best"] = max(bests)
    if "student" in state.get("last_eval", {}):
        for name, v in zip(spec.class_names, state["last_eval"]["student"]["iou"], strict=True):
            out[f"final/iou_student_last/{name}"] = v
    out["_confusion"] = state.get("last_eval", {}).get("student", {}).get("confusion")
    return out
