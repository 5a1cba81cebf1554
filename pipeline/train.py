"""The training loop: loaders, poly LR, EMA teacher, evaluation, checkpoint/resume.

Knows nothing about Ray, MLflow or DVC: `fit` reports each epoch through a callback, which
the orchestrator turns into Tune reports, MLflow metrics and checkpoints.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from pipeline.config import DatasetCfg, MethodCfg, ModelCfg, TrainCfg, build, to_dict
from pipeline.data.datasets import SegList, read_pairs
from pipeline.evaluate import background_only_miou, evaluate
from pipeline.method.align import DistributionAlignment
from pipeline.method.cplg import AdaptiveThresholds
from pipeline.method.dssn import Batch, dssn_step
from pipeline.method.ema import ema_update, make_teacher
from pipeline.method.losses import class_counts, ohem_ce, supervised_ce
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


def fast_path_applies(cfg: TrainCfg, device: torch.device) -> bool:
    """Whether `amp`/`channels_last`/`compile` take effect: always on CUDA, on a CPU only when forced
    (`fast_path_on_cpu`), because on a CPU they are slower and exist there to be tested."""
    return device.type == "cuda" or cfg.fast_path_on_cpu


@dataclass(frozen=True)
class Dist:
    """This process's place in a DDP group (Ray Train sets the process group up)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _loader(
    ds: SegList, batch: int, seed: int, cfg: TrainCfg, device: torch.device, dist: Dist = Dist()
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    if dist.world > 1:  # each rank a disjoint shard of the same seeded permutation, as the reference
        sampler = DistributedSampler(ds, num_replicas=dist.world, rank=dist.rank, shuffle=True, seed=seed)
    else:
        sampler = RandomSampler(ds, generator=g)
    return DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0,
        generator=g,
    )


def _cycle(loader: DataLoader) -> Iterator[dict]:
    """Endless batches; a loader that yields nothing in a whole pass is an error, not a busy loop."""
    while True:
        empty = True
        for b in loader:
            empty = False
            yield b
        if empty:
            raise RuntimeError(
                f"a data loader yielded no batch: {len(loader.dataset)} items, batch {loader.batch_size}, "
                "incomplete batches dropped"
            )


def early_rules(m: MethodCfg, iteration: int, semi_start: int, epoch_iters: int) -> tuple[bool, float]:
    """(strong-view CE off, EMA keep) at `iteration` (dssn-method.md §4.3): the teacher is a hard copy
    of the student (keep 0) through the warm-up and the first `teacher_copy_epochs` semi epochs (at
    least one step); the strong-view CE is off for `strong_off_epochs` and, with
    `skip_strong_first_iter`, on the first semi-supervised iteration."""
    since = iteration - semi_start
    copy = since < max(1, m.teacher_copy_epochs * epoch_iters)
    strong_off = since < m.strong_off_epochs * epoch_iters or (since == 0 and m.skip_strong_first_iter)
    return strong_off, 0.0 if copy else m.ema_keep


def _progress(cell: str, on: bool) -> Callable[[str], None]:
    """Progress lines of one trial (Ray forwards a trial's stdout to the driver, so they show in
    `dvc repro`'s output); flushed, so a slow or stuck step shows where it sits."""

    def say(msg: str) -> None:
        if on:
            print(f"[{cell}] {msg}", flush=True)

    return say


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


class _PseudoLabels:
    """One pseudo-label source over an epoch: per class, the valid pixels labelled with it and those
    kept, and how many kept ones match the ground truth (device tensors: no host sync per step)."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.k = k
        self.pred = torch.zeros(k, device=device)
        self.kept = torch.zeros(k, device=device)
        self.correct = torch.zeros((), device=device)

    def add(
        self, labels: torch.Tensor, keep: torch.Tensor, valid: torch.Tensor, gt: torch.Tensor | None
    ) -> None:
        pred, kept = class_counts(labels, keep, valid, self.k)
        self.pred += pred
        self.kept += kept
        if gt is not None:
            self.correct += (keep & (labels == gt)).sum()

    def metrics(self, class_names: list[str], suffix: str, mask_ratio: bool = False) -> dict[str, float]:
        """`train/pl_accuracy<suffix>`, `pseudo_kept<suffix>/<class>` (NaN where nothing was predicted or
        kept) and, with `mask_ratio`, `train/mask_ratio<suffix>` over the epoch."""
        nan = float("nan")
        kept, pred = self.kept.sum().item(), self.pred.sum().item()
        out = {f"train/pl_accuracy{suffix}": self.correct.item() / kept if kept else nan}
        if mask_ratio:
            out[f"train/mask_ratio{suffix}"] = kept / pred if pred else nan
        for c, name in enumerate(class_names):
            p = self.pred[c].item()
            out[f"pseudo_kept{suffix}/{name}"] = self.kept[c].item() / p if p else nan
        return out


def supervised_loss(cfg: TrainCfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The labeled loss of `cfg`: plain CE, or OHEM per `ohem_chunk` images of this device's batch."""
    if cfg.sup_loss == "ohem":
        return functools.partial(
            ohem_ce, thresh=cfg.ohem_thresh, min_kept=cfg.ohem_min_kept, chunk=cfg.ohem_chunk
        )
    return supervised_ce


class Trainer:
    """Student, EMA teacher, optimizer and one optimisation step — shared by `fit` and bench/step.py.

    The fast path (bf16 autocast, channels-last, torch.compile, foreach/fused optimizer and EMA)
    is on by default on CUDA (on a CPU with `fast_path_on_cpu`) and each part has its own switch in
    `TrainCfg`; a compile failure falls back to eager on the first step.

    Compiled region: the student and the teacher modules, each its own `torch.compile` (README
    "Performance", tests/test_fastpath_compiled.py): the convolutions are where the time goes;
    the selection and the losses stay eager, because the step's host-side random draws (CutMix
    boxes, strong views) would break a whole-step graph and the stateful thresholds would
    recompile it, for pointwise work that is a small part of the step.
    """

    def __init__(
        self,
        model_cfg: ModelCfg,
        cfg: TrainCfg,
        mcfg: MethodCfg,
        num_classes: int,
        device: torch.device,
        ddp: bool = False,
    ):
        self.cfg, self.mcfg, self.device = cfg, mcfg, device
        cuda = device.type == "cuda"
        fast_path = fast_path_applies(cfg, device)
        student = build_model(model_cfg, num_classes)
        if ddp and cuda:  # one BN statistic over the whole global batch, like the reference's SyncBN
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
        self.student = student.to(device)
        self.teacher = make_teacher(self.student) if (mcfg.use_unlabeled and mcfg.teacher) else None
        self.adaptive = (
            AdaptiveThresholds(num_classes, mcfg.adaptive_momentum, device)
            if mcfg.use_unlabeled and mcfg.selection == "adaptive"
            else None
        )
        self.align = (
            DistributionAlignment(num_classes, mcfg.pl_align_momentum, device)
            if mcfg.use_unlabeled and mcfg.pl_align
            else None
        )
        if fast_path and cfg.channels_last:
            self.student = self.student.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher = self.teacher.to(memory_format=torch.channels_last)
        groups = self.student.param_groups(cfg.lr, cfg.head_lr_mult)
        fast = {"fused": True} if cuda else {"foreach": True}
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(
                groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **fast
            )
        else:
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)
        self.sup_loss = supervised_loss(cfg)
        self.autocast = fast_path and cfg.amp
        self.step_model: torch.nn.Module = self.student
        self.step_teacher: torch.nn.Module | None = self.teacher
        if ddp:  # gradients all-reduced across the trial's workers
            self.step_model = torch.nn.parallel.DistributedDataParallel(
                self.student, device_ids=[device.index] if cuda else None, broadcast_buffers=False
            )
        self.compiled = False
        if cfg.compile and fast_path:
            self.step_model, self.compiled = torch.compile(self.step_model), True
            if self.teacher is not None:
                self.step_teacher = torch.compile(self.teacher)

    def _eager(self) -> None:
        """Back to the uncompiled modules (after a compile failure)."""
        self.step_model = getattr(self.step_model, "_orig_mod", self.student)
        self.step_teacher, self.compiled = self.teacher, False

    def _forward(self, b: Batch, gen: torch.Generator, strong_off: bool):
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return dssn_step(
                self.step_model,
                self.step_teacher,
                b,
                self.mcfg,
                self.sup_loss,
                gen,
                strong_off,
                self.adaptive,
                self.align,
            )

    def step(
        self,
        b: Batch,
        gen: torch.Generator,
        iteration: int,
        total: int,
        semi_start: int = 0,
        epoch_iters: int = 1,
    ) -> tuple[torch.Tensor, dict]:
        """Forward, backward, SGD step, poly LR for the next step, EMA update. No host sync.

        `semi_start`: the first iteration with unlabeled data (after a warm-up); `epoch_iters`: steps
        per epoch. Together they place the early-training rules (`early_rules`)."""
        strong_off, keep = early_rules(self.mcfg, iteration, semi_start, epoch_iters)
        try:
            loss, stats = self._forward(b, gen, strong_off)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        except Exception as e:  # noqa: BLE001 - compile failures surface on the first call
            if not self.compiled:
                raise
            print(f"torch.compile failed ({type(e).__name__}: {e}); falling back to eager")
            self._eager()
            loss, stats = self._forward(b, gen, strong_off)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.opt.step()
        done = iteration + 1
        scale = (1 - done / total) ** self.cfg.poly_power if done < total else 0.0
        for g in self.opt.param_groups:
            g["lr"] = g["lr0"] * scale
        if self.teacher is not None:
            ema_update(self.teacher, self.student, keep)
        return loss.detach(), stats


class PlanError(ValueError):
    """A trial that cannot train as configured: refused before any work, in one line naming the cause."""


def epoch_steps(spec: TrialSpec, n_lab: int, n_unl: int) -> int:
    """Steps per epoch: `train.iters_per_epoch`, else one pass over the list the epoch is counted on
    (labeled for `epoch_pass: labeled`, as the reference supervised.py; unlabeled otherwise)."""
    cfg = spec.train
    if cfg.iters_per_epoch:
        return cfg.iters_per_epoch
    if spec.method.epoch_pass == "labeled":
        return n_lab // cfg.batch_l
    return n_unl // cfg.batch_u


def check_plan(spec: TrialSpec, world: int = 1, sync_bn: bool | None = False) -> None:
    """Raise PlanError when this trial's loaders or batch norm cannot work on `world` workers.

    Shared by the driver (before Ray starts, before any result file or MLflow run) and `fit`, so a
    configuration that would hang or die inside Ray is refused at once instead:
    - a loader that would yield no batch: its list, or one worker's DistributedSampler shard of it
      (ceil(n / world) items), smaller than the per-worker batch, since incomplete batches are dropped;
    - an epoch of no step (`iters_per_epoch` unset and the list smaller than the global batch);
    - one image per device in a train-mode forward of a batch alone: batch norm over one value per
      channel (the ASPP image pooling is 1x1) cannot train. Those forwards are the student's in a
      supervised step (supervised variants, warm-up epochs) on the labeled batch, and the EMA
      teacher's in the first semi-supervised epoch (train-mode BN, the reference's quirk) on the
      unlabeled batch; the semi-supervised student always sees labeled + unlabeled together. The
      reference runs Cityscapes at 1 + 1 per GPU under SyncBatchNorm over 8 GPUs, so it works here
      when `sync_bn` (DDP on CUDA: `Trainer` converts to SyncBatchNorm) and `world` >= 2. CPU
      workers (gloo) have no SyncBatchNorm in this project: each normalises its own images, so 1
      per worker is refused there. `sync_bn=None`: not known yet (the driver before Ray knows the
      trial's GPUs); the batch-norm rule is then left to the later call.
    """
    cfg, m = spec.train, spec.method
    where = f"{spec.cell}:"
    workers = f"{world} worker{'s' if world > 1 else ''}"
    if cfg.batch_l % world or cfg.batch_u % world:
        raise PlanError(
            f"{where} train.batch_l/batch_u ({cfg.batch_l}/{cfg.batch_u}) must be divisible by the "
            f"{workers} of a trial (ray.workers_per_trial)"
        )
    if cfg.sup_loss == "ohem" and cfg.ohem_chunk and (cfg.batch_l // world) % cfg.ohem_chunk:
        raise PlanError(
            f"{where} train.ohem_chunk ({cfg.ohem_chunk}) must divide each worker's labeled batch "
            f"({cfg.batch_l} / {workers} = {cfg.batch_l // world})"
        )
    split = Path(spec.split_dir) / spec.split
    sizes = {}
    for name in ("labeled.txt", "unlabeled.txt"):
        try:
            sizes[name] = len(read_pairs(split / name))
        except ValueError as e:
            raise PlanError(f"{where} {e}") from e
    n_lab, n_unl = sizes["labeled.txt"], sizes["unlabeled.txt"]
    # (list, items the loader draws from, its items as the dataset holds them, batch key, global batch)
    loaders = []  # the unlabeled list first: the labeled loader's length follows it
    if m.use_unlabeled:
        loaders.append(("unlabeled.txt", n_unl, n_unl, "train.batch_u", cfg.batch_u))
    if m.epoch_pass == "labeled":
        loaders.append(("labeled.txt", n_lab, n_lab, "train.batch_l", cfg.batch_l))
    else:  # SegList repeats the labeled list to the unlabeled list's length
        loaders.append(("labeled.txt", n_lab, max(n_lab, n_unl), "train.batch_l", cfg.batch_l))
    for name, n_file, n_items, key, batch in loaders:
        shard, per = -(-n_items // world), batch // world
        if shard < per:
            held = f"{n_file} items" + (f", repeated to {n_items}" if n_items != n_file else "")
            where_batch = (
                "on 1 worker"
                if world == 1
                else f"over {workers}: each worker's shard holds {shard}, fewer than its {per}"
            )
            raise PlanError(
                f"{where} {split / name} ({held}) with {key} {batch} {where_batch}, so its loader would "
                f"yield no batch (incomplete batches are dropped); lower {key} or use a split with more items"
            )
    if epoch_steps(spec, n_lab, n_unl) == 0:
        what = (
            f"{split / 'labeled.txt'} ({n_lab} items) with train.batch_l {cfg.batch_l}"
            if m.epoch_pass == "labeled"
            else f"{split / 'unlabeled.txt'} ({n_unl} items) with train.batch_u {cfg.batch_u}"
        )
        raise PlanError(
            f"{where} an epoch would have no step: {what} (incomplete batches are dropped); "
            "set train.iters_per_epoch or lower the batch"
        )
    if world > 1 and sync_bn is not False:
        return  # SyncBatchNorm normalises over the global batch (or not known yet)
    supervised = not m.use_unlabeled or m.warmup_epochs > 0
    teacher_bn = m.use_unlabeled and m.teacher
    for alone, key, batch, forward in (
        (
            supervised,
            "train.batch_l",
            cfg.batch_l,
            "the student in a supervised step (variant "
            f"{spec.variant}{', warm-up epochs' if m.use_unlabeled else ''}) on the labeled images alone",
        ),
        (
            teacher_bn,
            "train.batch_u",
            cfg.batch_u,
            "the EMA teacher, in train mode in the first "
            "semi-supervised epoch, on the unlabeled images alone",
        ),
    ):
        if alone and batch // world < 2:
            how = "workers on CPU (gloo) have no SyncBatchNorm; " if world > 1 else ""
            raise PlanError(
                f"{where} {key} {batch} over {workers} puts 1 image per device into {forward}: batch "
                "norm over 1 value per channel (ASPP image pooling) cannot train; "
                f"{how}use at least 2 per device, or, as the reference's 1 + 1 per GPU, "
                "ray.workers_per_trial >= 2 on GPUs (SyncBatchNorm over the whole batch)"
            )


def fit(
    spec: TrialSpec,
    on_epoch: EpochCallback | None = None,
    resume: dict | None = None,
    dist: Dist = Dist(),
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train one trial; returns the final summary. `resume` is a state from a previous `on_epoch`.

    With `dist.world` > 1 (a DDP worker) each rank sees 1/world of every batch and rank 0 alone
    evaluates; `spec.train.batch_*` stay the global batch sizes.
    """
    t0 = time.time()
    cfg, mcfg = spec.train, spec.method
    device = device or pick_device(cfg)
    # the driver ran the same check before Ray started; here the device is known for certain
    check_plan(spec, dist.world, sync_bn=dist.world > 1 and device.type == "cuda")
    batch_l, batch_u = cfg.batch_l // dist.world, cfg.batch_u // dist.world
    if device.type == "cpu":
        torch.set_num_threads(cfg.threads)
        torch.set_flush_denormal(cfg.flush_denormal)  # per process; Ray reuses worker processes
    torch.manual_seed(spec.seed)
    np.random.seed(spec.seed)
    k = spec.dataset.num_classes

    root, split_dir = Path(spec.root), Path(spec.split_dir)
    scale = tuple(cfg.scale)
    unl = SegList(root, split_dir / spec.split / "unlabeled.txt", "train_u", cfg.crop, scale=scale)
    if mcfg.epoch_pass == "labeled":  # the reference supervised.py: one pass over the labeled list
        lab = SegList(root, split_dir / spec.split / "labeled.txt", "train_l", cfg.crop, scale=scale)
    else:  # the semi-supervised scripts: the labeled list repeated to the unlabeled list's length
        lab = SegList(
            root, split_dir / spec.split / "labeled.txt", "train_l", cfg.crop, length=len(unl), scale=scale
        )
    iters = epoch_steps(spec, len(lab), len(unl))
    val = SegList(root, split_dir / "val.txt", "val")
    total = iters * cfg.epochs
    if mcfg.use_unlabeled and mcfg.warmup_epochs >= cfg.epochs:
        raise ValueError(
            f"method.warmup_epochs ({mcfg.warmup_epochs}) must be below train.epochs ({cfg.epochs})"
        )
    semi_start = iters * mcfg.warmup_epochs

    tr = Trainer(spec.model, cfg, mcfg, k, device, ddp=dist.world > 1)
    student, teacher, opt = tr.student, tr.teacher, tr.opt

    state = {"epoch": 0, "iteration": 0, "history": [], "best": {}}
    if resume is not None:
        student.load_state_dict(resume["student"])
        if teacher is not None and resume.get("teacher") is not None:
            teacher.load_state_dict(resume["teacher"])
        opt.load_state_dict(resume["optimizer"])
        if tr.adaptive is not None and resume.get("adaptive") is not None:
            tr.adaptive.load_state_dict(resume["adaptive"])
        if tr.align is not None and resume.get("align") is not None:
            tr.align.load_state_dict(resume["align"])
        state = {k_: resume[k_] for k_ in ("epoch", "iteration", "history", "best")}
        state["last_eval"] = resume.get("last_eval", {})  # a trial killed after its last epoch
        if "rng" in resume:  # the global RNGs drive dropout and the loaders' per-sample draws
            torch.set_rng_state(resume["rng"]["torch"])
            np.random.set_state(resume["rng"]["numpy"])
            if device.type == "cuda" and resume["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(resume["rng"]["cuda"], device)

    val_loader = DataLoader(val, batch_size=cfg.eval_batch, shuffle=False, num_workers=cfg.workers)
    say = _progress(spec.cell, dist.main and cfg.progress_every > 0)
    say(
        f"{cfg.epochs} epoch(s) x {iters} steps on {device.type}"
        + (f" x {dist.world} workers" if dist.world > 1 else "")
        + f", batch {batch_l} + {batch_u} per worker, crop {cfg.crop}; labeled {len(lab)}, "
        f"unlabeled {len(unl)}, val {len(val)} items"
        + (f"; resuming at epoch {state['epoch'] + 1}" if state["epoch"] else "")
    )
    gen = torch.Generator()  # CPU: augmentation/box parameters are scalars drawn on the host, no device sync
    metrics: dict[str, float] = {}

    for epoch in range(state["epoch"], cfg.epochs):
        gen.manual_seed(spec.seed * 100_003 + epoch * 101 + dist.rank)  # own augmentation draws per rank
        it_l = _cycle(_loader(lab, batch_l, spec.seed * 1000 + epoch, cfg, device, dist))
        it_u = it_m = None
        semi = mcfg.use_unlabeled and epoch >= mcfg.warmup_epochs
        if semi:
            it_u = _cycle(_loader(unl, batch_u, spec.seed * 1000 + epoch + 1, cfg, device, dist))
            it_m = _cycle(_loader(unl, batch_u, spec.seed * 1000 + epoch + 7, cfg, device, dist))
        student.train()
        if teacher is not None:
            # reference quirk: train-mode BN in the first (semi-supervised) epoch, eval mode afterwards
            teacher.train(epoch == mcfg.warmup_epochs)
        acc = _Accum()
        # the student's weak view (feature level) and the teacher's image-level maps (what loss_s uses)
        pl_student, pl_teacher = _PseudoLabels(k, device), _PseudoLabels(k, device)
        t_mark, step_mark = time.time(), state["iteration"]
        for i in range(iters):
            bl = _to(next(it_l), device)
            b = Batch(x=bl["image"], y=bl["mask"])
            bu = None
            if semi:
                bu, bm = _to(next(it_u), device), _to(next(it_m), device)
                b = dataclasses.replace(
                    b,
                    u=bu["image"],
                    u_ign=bu["ignore"],
                    m=bm["image"],
                    m_ign=bm["ignore"],
                    u_gt=bu["gt"],
                    m_gt=bm["gt"],
                )
            loss, stats = tr.step(b, gen, state["iteration"], total, semi_start, iters)
            state["iteration"] += 1
            labels, keep = stats.pop("pl_labels", None), stats.pop("pl_keep", None)
            if labels is not None and bu is not None:
                pl_student.add(labels, keep, ~bu["ignore"], bu["gt"])
            t_labels, t_keep = stats.pop("plt_labels", None), stats.pop("plt_keep", None)
            t_valid, t_gt = stats.pop("plt_valid", None), stats.pop("plt_gt", None)
            if t_labels is not None:
                pl_teacher.add(t_labels, t_keep, t_valid, t_gt)
            acc.add({"loss": loss.detach(), **stats})
            done = state["iteration"]
            if i == 0 or i + 1 == iters or (cfg.progress_every and done % cfg.progress_every == 0):
                if dist.main and cfg.progress_every:  # the loss is a host sync: only on printed steps
                    per = (time.time() - t_mark) / max(done - step_mark, 1)
                    eta = per * (total - done)
                    say(
                        f"step {done}/{total} (epoch {epoch + 1}/{cfg.epochs}) {per:.2f} s/step "
                        f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d} "
                        f"loss {loss.item():.4f}"
                    )
                t_mark, step_mark = time.time(), done

        epoch_metrics = {f"train/{k_}": v for k_, v in acc.means().items()}
        epoch_metrics["train/lr"] = opt.param_groups[0]["lr"]
        if mcfg.use_unlabeled:
            epoch_metrics.update(pl_student.metrics(spec.class_names, ""))
            epoch_metrics.update(pl_teacher.metrics(spec.class_names, "_teacher", mask_ratio=True))
        if tr.adaptive is not None:
            for name, t in zip(spec.class_names, tr.adaptive.value().tolist(), strict=True):
                epoch_metrics[f"pl_threshold/{name}"] = t
        if tr.align is not None:
            for name, a in zip(spec.class_names, tr.align.ratio().tolist(), strict=True):
                epoch_metrics[f"pl_align/{name}"] = a
        state["epoch"] = epoch + 1
        last = epoch + 1 == cfg.epochs
        if dist.main and ((epoch + 1) % cfg.eval_every == 0 or last):
            for who, model in (("student", student), ("teacher", teacher)):
                if model is None:
                    continue
                t_ev = time.time()
                ev = evaluate(model, val_loader, k, device, spec.dataset.eval_mode, cfg.crop, tr.autocast)
                say(
                    f"epoch {epoch + 1}: {who} mIoU {ev['miou']:.2f} on {len(val)} val images "
                    f"({spec.dataset.eval_mode}) in {time.time() - t_ev:.1f} s"
                )
                epoch_metrics[f"val/miou_{who}"] = ev["miou"]
                for name, v in zip(spec.class_names, ev["iou"], strict=True):
                    epoch_metrics[f"val_class_{who}/{name}"] = v
                best = state["best"].get(who)
                if best is None or ev["miou"] > best["miou"]:
                    state["best"][who] = {"miou": ev["miou"], "epoch": epoch + 1}
                state.setdefault("last_eval", {})[who] = {
                    "miou": ev["miou"],
                    "iou": ev["iou"],
                    "confusion": ev["confusion"].tolist(),
                }
        epoch_metrics["epoch"] = epoch + 1
        state["history"].append({k_: v for k_, v in epoch_metrics.items() if not k_.startswith("val_class")})
        metrics = epoch_metrics
        if on_epoch is not None:
            ckpt = {
                "student": student.state_dict(),
                "teacher": teacher.state_dict() if teacher is not None else None,
                "optimizer": opt.state_dict(),
                "adaptive": tr.adaptive.state_dict() if tr.adaptive is not None else None,
                "align": tr.align.state_dict() if tr.align is not None else None,
                **copy.deepcopy(state),  # a snapshot: later epochs must not alter it
                "spec": spec.to_dict(),
                "rng": {  # so that a resumed trial repeats the uninterrupted one exactly
                    "torch": torch.get_rng_state(),
                    "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                },
            }
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
        cm = torch.tensor(state["last_eval"]["student"]["confusion"])
        out["final/miou_background_only"] = background_only_miou(cm)
    out["_confusion"] = state.get("last_eval", {}).get("student", {}).get("confusion")
    return out
