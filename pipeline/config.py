"""params.yaml -> one frozen, validated config tree.

Every error names the offending key (dotted path) and what was expected, so a typo in
params.yaml fails before any data is touched or any GPU is reserved.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A params.yaml problem; the message names the key and the expected value."""


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class PathsCfg:
    data: str = "data"
    results: str = "results"
    ray_results: str = "ray_results"
    mlflow_uri: str | None = None  # None -> sqlite:///<repo>/mlflow.db (MLFLOW_TRACKING_URI wins)
    mlflow_artifacts: str = "mlartifacts"


@dataclass(frozen=True)
class SyntheticCfg:
    n_train: int = 1536
    n_val: int = 256
    size: int = 64
    seed: int = 0
    # the scene (pipeline.data.synthetic.Scene): the defaults are the benchmark's difficulty
    objects: list[int] = field(default_factory=lambda: [1, 4])
    radius: list[float] = field(default_factory=lambda: [0.10, 0.32])
    aspect: list[float] = field(default_factory=lambda: [0.75, 1.33])
    truncate: bool = True
    clutter: int = 3
    textures: bool = True
    balanced: bool = False
    grey_background: bool = False

    def validate(self, key: str) -> None:
        _check(self.n_train >= 16, f"{key}.n_train", "an integer >= 16", self.n_train)
        _check(self.n_val >= 1, f"{key}.n_val", "an integer >= 1", self.n_val)
        _check(32 <= self.size <= 512, f"{key}.size", "an integer in [32, 512]", self.size)
        _check(self.seed >= 0, f"{key}.seed", "an integer >= 0", self.seed)
        lo_hi = len(self.objects) == 2 and 1 <= self.objects[0] <= self.objects[1] <= 16
        _check(lo_hi, f"{key}.objects", "[min, max] with 1 <= min <= max <= 16", self.objects)
        ok = len(self.radius) == 2 and 0.02 <= self.radius[0] <= self.radius[1] <= 0.5
        _check(
            ok, f"{key}.radius", "[min, max] with 0.02 <= min <= max <= 0.5 (of the image size)", self.radius
        )
        ok = len(self.aspect) == 2 and 0.25 <= self.aspect[0] <= self.aspect[1] <= 4
        _check(ok, f"{key}.aspect", "[min, max] with 0.25 <= min <= max <= 4", self.aspect)
        _check(0 <= self.clutter <= 16, f"{key}.clutter", "an integer in [0, 16]", self.clutter)

    def scene(self) -> Any:
        """The generator's Scene from the fields of the same names (imported here: config stays
        free of numpy/PIL at import; lists become the Scene's tuples)."""
        from pipeline.data.synthetic import Scene

        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(Scene)}
        return Scene(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclass(frozen=True)
class SourceCfg:
    """Where a real dataset comes from: URL (default) or what the user already has offline."""

    url: str | None = None
    md5: str | None = None
    archive: str | None = None  # an archive already on disk: verify + extract, no download
    extracted: str | None = None  # an extracted tree already on disk: verify only
    sbd_url: str | None = None
    sbd_md5: str | None = None
    sbd_archive: str | None = None
    sbd_extracted: str | None = None
    use_sbd: bool = True
    verify_counts: bool = True  # insist on the full official release (image counts per list/folder)
    synthetic: SyntheticCfg | None = None  # kind synthetic: the generator's settings are its source


@dataclass(frozen=True)
class SplitsCfg:
    """One split protocol of a dataset; its key in `datasets.<name>.protocols` is the protocol."""

    names: list[str] = field(default_factory=lambda: ["1_16", "1_8", "1_4"])
    # generate: the protocol's rule; published: the lists the paper used (LiheYoung/UniMatch at a
    # pinned commit, md5-verified, pipeline/data/published.py); official: your own lists in a folder
    source: Literal["generate", "official", "published"] = "generate"
    official_root: str | None = None  # official: a folder laid out like UniMatch's splits/<dataset>/
    published_url: str | None = None  # published: a mirror of UniMatch's splits/; null = pinned commit
    published_root: str | None = None  # published: a local copy of UniMatch's splits/ (no network)
    seed: int = 0


PROTOCOLS = ("blended", "classic", "cityscapes", "random")


@dataclass(frozen=True)
class DatasetCfg:
    kind: Literal["synthetic", "voc", "cityscapes"]
    num_classes: int
    protocols: dict[str, SplitsCfg] = field(default_factory=lambda: {"blended": SplitsCfg()})
    source: SourceCfg = field(default_factory=SourceCfg)
    eval_mode: Literal["whole", "sliding"] = "whole"

    def validate(self, key: str) -> None:
        _check(2 <= self.num_classes <= 255, f"{key}.num_classes", "an integer in [2, 255]", self.num_classes)
        if self.kind == "synthetic":
            _check(
                self.source.synthetic is not None,
                f"{key}.source.synthetic",
                "a block (kind is synthetic)",
                None,
            )
            self.source.synthetic.validate(f"{key}.source.synthetic")  # type: ignore[union-attr]
        _check(len(self.protocols) > 0, f"{key}.protocols", "at least one split protocol", self.protocols)
        for name, sp in self.protocols.items():
            _check(name in PROTOCOLS, f"{key}.protocols.{name}", f"one of {list(PROTOCOLS)}", name)
            _check(len(sp.names) > 0, f"{key}.protocols.{name}.names", "a non-empty list", sp.names)
            _unique(sp.names, f"{key}.protocols.{name}.names")
            for s in sp.names:
                _check(_SAFE.fullmatch(s) is not None, f"{key}.protocols.{name}.names", _SAFE_TEXT, s)
            _check(sp.seed >= 0, f"{key}.protocols.{name}.seed", "an integer >= 0", sp.seed)
            _check(
                sp.source != "published" or self.kind != "synthetic",
                f"{key}.protocols.{name}.source",
                "'generate' or 'official' for a synthetic dataset (lists are published for VOC and Cityscapes)",
                sp.source,
            )


# ResNets: the paper's trunks. MobileNetV3: beyond the paper, CPU-sized trunks for the embedded demo.
Backbone = Literal[
    "resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_small", "mobilenet_v3_large"
]


@dataclass(frozen=True)
class ModelCfg:
    backbone: Backbone = "resnet101"
    deep_stem: bool = True  # the reference weights need the 3x(3x3) stem
    output_stride: Literal[8, 16] = 16
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    aspp_channels: int = 256
    skip_channels: int = 48
    decoder_channels: int = 256
    pretrained: str | None = None  # URL or local path of a backbone state_dict

    def validate(self, key: str) -> None:
        _check(
            not (self.deep_stem and self.backbone.startswith("mobilenet")),
            f"{key}.deep_stem",
            f"false for {self.backbone} (the deep stem is a ResNet stem)",
            self.deep_stem,
        )
        _check(len(self.aspp_rates) == 3, f"{key}.aspp_rates", "three atrous rates", self.aspp_rates)
        for v in self.aspp_rates:
            _check(v >= 1, f"{key}.aspp_rates", "three integers >= 1", self.aspp_rates)
        for k in ("aspp_channels", "skip_channels", "decoder_channels"):
            v = getattr(self, k)
            _check(v >= 8, f"{key}.{k}", "an integer >= 8", v)


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 100
    iters_per_epoch: int | None = None  # None -> one pass over the unlabeled list (reference rule)
    batch_l: int = 8
    batch_u: int = 8
    crop: int = 513
    scale: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random rescale of the weak view
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.002
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    sup_loss: Literal["ce", "ohem"] = "ce"
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 200_000
    # images per OHEM call (the reference's per-GPU batch: Cityscapes R101 1, R50 2); null = the whole
    # batch on this device. The loss is the mean of the chunks' OHEM means, as DDP makes it.
    ohem_chunk: int | None = None
    eval_every: int = 1
    eval_batch: int = 1  # >1 only when all val images share one size
    threads: int = 1  # torch intra-op threads per trial on CPU
    # CPU only: flush denormal floats to zero (torch.set_flush_denormal). A from-scratch model's
    # gradients and AdamW second moments hold many denormals, which x86 CPUs compute ~100x slower;
    # flushing them made a ResNet-18 step at 64 px ~2x faster (bench/demo_budget.py). Off by default
    # (IEEE arithmetic, as every earlier CPU result was computed); the embedded demo turns it on.
    flush_denormal: bool = False
    workers: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # The fast path, used on CUDA only unless `fast_path_on_cpu` (CPU runs ignore these): bf16
    # autocast, channels-last memory format, torch.compile of the student and teacher forwards
    # (falls back to eager if compilation fails). Fused SGD/AdamW and foreach EMA are always on.
    amp: bool = True
    channels_last: bool = True
    compile: bool = True
    # Apply the three switches above on a CPU too (bf16 autocast on CPU, inductor's C++ backend):
    # so the GPU path's compile, graph breaks and bf16 numerics are tested where no GPU is.
    fast_path_on_cpu: bool = False
    log_images: int = 4  # prediction/ground-truth panels logged per trial
    log_checkpoints: bool = False  # also upload best/last student weights as MLflow artifacts
    progress_every: int = 50  # a progress line from the trial every N steps (and the first); 0 = off

    def validate(self, key: str) -> None:
        _check(self.epochs >= 1, f"{key}.epochs", "an integer >= 1", self.epochs)
        _check(
            self.iters_per_epoch is None or self.iters_per_epoch >= 1,
            f"{key}.iters_per_epoch",
            "null or an integer >= 1",
            self.iters_per_epoch,
        )
        _check(
            self.batch_l >= 1 and self.batch_u >= 1,
            f"{key}.batch_l/batch_u",
            "integers >= 1",
            (self.batch_l, self.batch_u),
        )
        _check(self.crop >= 32, f"{key}.crop", "an integer >= 32", self.crop)
        ok = len(self.scale) == 2 and 0.1 <= self.scale[0] <= self.scale[1] <= 4
        _check(ok, f"{key}.scale", "[min, max] with 0.1 <= min <= max <= 4", self.scale)
        _check(self.lr > 0, f"{key}.lr", "a positive float", self.lr)
        _check(0 < self.ohem_thresh < 1, f"{key}.ohem_thresh", "a float in (0, 1)", self.ohem_thresh)
        _check(self.ohem_min_kept >= 0, f"{key}.ohem_min_kept", "an integer >= 0", self.ohem_min_kept)
        _check(
            self.ohem_chunk is None or (self.ohem_chunk >= 1 and self.batch_l % self.ohem_chunk == 0),
            f"{key}.ohem_chunk",
            f"null or a positive divisor of batch_l ({self.batch_l})",
            self.ohem_chunk,
        )
        _check(self.threads >= 1, f"{key}.threads", "an integer >= 1", self.threads)
        _check(self.progress_every >= 0, f"{key}.progress_every", "an integer >= 0", self.progress_every)
        _check(self.eval_every >= 1, f"{key}.eval_every", "an integer >= 1", self.eval_every)
        _check(self.eval_batch >= 1, f"{key}.eval_batch", "an integer >= 1", self.eval_batch)
        _check(self.workers >= 0, f"{key}.workers", "an integer >= 0 (data-loader processes)", self.workers)
        _check(self.log_images >= 0, f"{key}.log_images", "an integer >= 0", self.log_images)
        _check(self.head_lr_mult > 0, f"{key}.head_lr_mult", "a float > 0", self.head_lr_mult)
        _check(0 <= self.momentum < 1, f"{key}.momentum", "a float in [0, 1)", self.momentum)
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "a float >= 0", self.weight_decay)
        _check(self.poly_power >= 0, f"{key}.poly_power", "a float >= 0", self.poly_power)


@dataclass(frozen=True)
class MethodCfg:
    """Every switch of the DSSN step. Defaults = the released VOC code (dssn-method.md)."""

    use_unlabeled: bool = True
    teacher: bool = True  # EMA teacher gives the image-level pseudo-labels (False: UniMatch, student)
    ema_keep: float = 0.996
    n_fp: Literal[0, 1, 2] = 2  # feature-level (channel-dropout) views
    fp_dropout: float = 0.5
    fp_levels: Literal["both", "high"] = "both"  # code drops c1 and c4; the paper says high level only
    # "adaptive" is beyond the paper: FreeMatch-style per-class thresholds (cplg.AdaptiveThresholds)
    selection: Literal["cplg", "fixed", "adaptive"] = "cplg"
    r: float = 0.96
    tau_low: float = 0.92
    threshold: float = 0.95  # fixed-threshold selection (UniMatch, Fig. 4 baselines)
    adaptive_momentum: float = 0.999  # EMA keep per step of the adaptive thresholds (FreeMatch's)
    con_img: bool = True  # image-level logit consistency (s1 vs s2)
    con_feat: bool = True  # feature-level logit consistency (fp vs Fp)
    con_mode: Literal["zscore_mse", "raw_l2"] = "zscore_mse"  # code vs paper formula
    w_s: float = 0.25  # gamma2 per image-level view
    w_fp: float = 0.25  # gamma2 per feature-level view (UniMatch: 0.5 for its single view)
    w_con: float = 0.01  # gamma1
    global_scale: float = 0.5  # the code halves the whole objective
    skip_strong_first_iter: bool = True
    # Early training, counted from the first semi-supervised epoch (dssn-method.md §4.3). The VOC code
    # (the defaults): the teacher is hard-copied from the student after iteration 0 only, and that
    # iteration has no strong-view CE (`skip_strong_first_iter`). The released Cityscapes code and its
    # ResNet-101 logs: teacher copied after every step and no strong-view CE for epochs 0-4
    # (`teacher_copy_epochs: 5, strong_off_epochs: 5`). The Cityscapes ResNet-50 logs: strong-view CE
    # from iteration 0, teacher copied during epoch 0 (`teacher_copy_epochs: 1,
    # skip_strong_first_iter: false`).
    teacher_copy_epochs: int = 0
    strong_off_epochs: int = 0
    # What one epoch is: one pass over the unlabeled list with the labeled list repeated to its length
    # (the semi-supervised scripts), or one pass over the labeled list (the reference supervised.py,
    # variant `supervised_ref`; labeled-only training).
    epoch_pass: Literal["unlabeled", "labeled"] = "unlabeled"
    intensity_ops: bool = True  # DSSN-VOC extra random intensity ops
    cutmix_p: float = 0.5
    # Diagnostic, not a method: the unlabeled images' ground truth replaces every pseudo-label
    # (all non-ignored pixels kept). The score it reaches bounds what better pseudo-labels could buy
    # and checks the unlabeled branch's plumbing (crops, CutMix compositing, ignore maps).
    oracle_pseudo_labels: bool = False
    # Beyond the paper (0 = the code): epochs of labeled-only training before the unlabeled branch
    # starts, the teacher then hard-copied from the warmed-up student, so that the first
    # pseudo-labels come from a model that is moderate on every class (calibration.md).
    warmup_epochs: int = 0
    # Beyond the paper ("none" = the code): "selection" reweights the pseudo-label CE terms so that
    # each class weighs what the teacher predicts of it, not what the confidence gate lets through
    # (losses.selection_weights; a class's factor is capped at `pl_balance_cap`).
    pl_balance: Literal["none", "selection"] = "none"
    pl_balance_cap: float = 10.0
    # Beyond the paper (False = the code): distribution alignment of the pseudo-label maps before
    # selection (method/align.py), with EMAs of momentum `pl_align_momentum` per step.
    pl_align: bool = False
    pl_align_momentum: float = 0.999

    def validate(self, key: str) -> None:
        _check(0 < self.r <= 1, f"{key}.r", "a float in (0, 1]", self.r)
        _check(0 <= self.tau_low < 1, f"{key}.tau_low", "a float in [0, 1)", self.tau_low)
        _check(0 <= self.threshold <= 1, f"{key}.threshold", "a float in [0, 1]", self.threshold)
        for k in ("ema_keep", "fp_dropout", "adaptive_momentum", "pl_align_momentum"):
            _check(0 <= getattr(self, k) < 1, f"{key}.{k}", "a float in [0, 1)", getattr(self, k))
        _check(0 <= self.cutmix_p <= 1, f"{key}.cutmix_p", "a float in [0, 1]", self.cutmix_p)
        for k in ("w_s", "w_fp", "w_con", "global_scale"):
            _check(getattr(self, k) >= 0, f"{key}.{k}", "a float >= 0", getattr(self, k))
        for k in ("warmup_epochs", "teacher_copy_epochs", "strong_off_epochs"):
            _check(getattr(self, k) >= 0, f"{key}.{k}", "an integer >= 0", getattr(self, k))
        _check(
            self.epoch_pass == "unlabeled" or not self.use_unlabeled,
            f"{key}.epoch_pass",
            "'unlabeled' when the unlabeled data is used (use_unlabeled: true)",
            self.epoch_pass,
        )
        _check(self.pl_balance_cap >= 1, f"{key}.pl_balance_cap", "a float >= 1", self.pl_balance_cap)


@dataclass(frozen=True)
class RayCfg:
    num_cpus: int | None = None  # local cluster size; None = all cores. Ignored with RAY_ADDRESS.
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None = 1 per worker if the cluster has GPUs else 0
    workers_per_trial: int = 1  # > 1: DDP over that many workers (Ray Train); batch_l/batch_u stay global
    max_concurrent: int | None = None
    max_failures: int = 1

    def validate(self, key: str) -> None:
        _check(
            self.num_cpus is None or self.num_cpus >= 1,
            f"{key}.num_cpus",
            "null or an integer >= 1",
            self.num_cpus,
        )
        _check(self.max_failures >= 0, f"{key}.max_failures", "an integer >= 0", self.max_failures)
        _check(self.cpus_per_trial > 0, f"{key}.cpus_per_trial", "a float > 0", self.cpus_per_trial)
        _check(
            self.workers_per_trial >= 1, f"{key}.workers_per_trial", "an integer >= 1", self.workers_per_trial
        )
        _check(
            self.gpus_per_trial is None or self.gpus_per_trial >= 0,
            f"{key}.gpus_per_trial",
            "null or a float >= 0",
            self.gpus_per_trial,
        )
        _check(
            self.max_concurrent is None or self.max_concurrent >= 0,
            f"{key}.max_concurrent",
            "null or an integer >= 0 (0 or null: no limit)",
            self.max_concurrent,
        )


@dataclass(frozen=True)
class OverridesCfg:
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyCfg:
    dataset: str
    protocol: str
    splits: list[str]
    variants: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    backbones: list[str] = field(default_factory=list)  # empty = model.backbone
    # a variant trained on some of the splits only, e.g. {dssn: ["1_16"]}: fewer, longer cells
    # where a budget is short (the demo); unnamed variants train on every split
    variant_splits: dict[str, list[str]] = field(default_factory=dict)
    paper_table: str | None = None
    publish: str | None = None  # a committed Markdown file the report also writes this study's tables into
    overrides: OverridesCfg = field(default_factory=OverridesCfg)
    # per backbone, on top of `overrides` (e.g. the reference's Cityscapes R50 and R101 runs differ in
    # their early-training rule and OHEM chunk)
    backbone_overrides: dict[str, OverridesCfg] = field(default_factory=dict)

    def cell_sections(
        self, params: Params, backbone: str | None, key: str
    ) -> tuple[ModelCfg, TrainCfg, MethodCfg]:
        """Model, train and method settings of this study's cells on `backbone` (None: the default)."""
        model = merge(params.model, self.overrides.model, f"{key}.overrides.model")
        train = merge(params.train, self.overrides.train, f"{key}.overrides.train")
        method = merge(params.method, self.overrides.method, f"{key}.overrides.method")
        backbone = backbone or model.backbone
        model = merge(model, {"backbone": backbone}, f"{key}.backbones")
        extra = self.backbone_overrides.get(backbone)
        if extra is not None:
            k = f"{key}.backbone_overrides.{backbone}"
            model = merge(model, extra.model, f"{k}.model")
            train = merge(train, extra.train, f"{k}.train")
            method = merge(method, extra.method, f"{k}.method")
        return model, train, method


@dataclass(frozen=True)
class SweepCfg:
    """A Ray Tune sweep over CPLG's r x tau_low around one cell of a study."""

    study: str  # dataset, overrides and backbone come from this study
    split: str
    variant: str = "dssn"
    seeds: list[int] = field(default_factory=lambda: [0])
    r: list[float] = field(default_factory=lambda: [0.9, 0.94, 0.96, 0.98])
    tau_low: list[float] = field(default_factory=lambda: [0.85, 0.9, 0.92, 0.95])
    mode: Literal["grid", "explore"] = "grid"  # grid: full budget, for tables; explore: ASHA early stopping
    search: Literal["random", "optuna"] = "optuna"  # explore mode: how (r, tau_low) are proposed
    num_samples: int = 16  # explore mode: number of trials
    grace_period: int = 1  # explore mode: epochs before ASHA may stop a trial
    reduction_factor: int = 2
    # explore mode: trials at once. TPE proposes from finished trials and ASHA compares a trial with
    # those that reached its rung first, so 1 makes an exploration repeatable (decisions included)
    max_concurrent: int = 4
    overrides: OverridesCfg = field(
        default_factory=OverridesCfg
    )  # on top of the study's (e.g. a shorter budget)

    def validate(self, key: str) -> None:
        for v in self.r:
            _check(0 < v <= 1, f"{key}.r", "values in (0, 1]", v)
        for v in self.tau_low:
            _check(0 <= v < 1, f"{key}.tau_low", "values in [0, 1)", v)
        _check(len(self.r) > 0 and len(self.tau_low) > 0, key, "non-empty r and tau_low lists", self)
        _check(self.num_samples >= 1, f"{key}.num_samples", "an integer >= 1", self.num_samples)
        _check(self.grace_period >= 1, f"{key}.grace_period", "an integer >= 1", self.grace_period)
        _check(len(self.seeds) > 0, f"{key}.seeds", "a non-empty list", self.seeds)
        _unique(self.seeds, f"{key}.seeds")
        for s in self.seeds:
            _check(s >= 0, f"{key}.seeds", "integers >= 0", s)
        _check(
            self.reduction_factor >= 2, f"{key}.reduction_factor", "an integer >= 2", self.reduction_factor
        )
        _check(self.max_concurrent >= 1, f"{key}.max_concurrent", "an integer >= 1", self.max_concurrent)


@dataclass(frozen=True)
class PretrainCfg:
    """A backbone pretrained on a pretext task over disjoint synthetic images (the ImageNet
    analogue of the embedded benchmark); written to data/pretrained/<name>.pt."""

    backbone: Backbone = "resnet18"
    deep_stem: bool = False
    seed: int = 1  # generator seed: must differ from every synthetic dataset's (disjoint images)
    n_images: int = 8192
    n_val: int = 512
    size: int = 64
    steps: int = 2000
    batch: int = 32
    lr: float = 0.002
    weight_decay: float = 1e-4
    threads: int = 2
    flush_denormal: bool = False  # flush denormal floats to zero (train.flush_denormal: ~2x faster on CPU)

    def validate(self, key: str) -> None:
        for k in ("n_images", "n_val", "steps", "batch", "threads"):
            _check(getattr(self, k) >= 1, f"{key}.{k}", "an integer >= 1", getattr(self, k))
        _check(32 <= self.size <= 512, f"{key}.size", "an integer in [32, 512]", self.size)
        _check(self.lr > 0, f"{key}.lr", "a positive number", self.lr)
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "a float >= 0", self.weight_decay)
        _check(self.seed >= 0, f"{key}.seed", "an integer >= 0", self.seed)


@dataclass(frozen=True)
class Params:
    paths: PathsCfg
    datasets: dict[str, DatasetCfg]
    model: ModelCfg
    train: TrainCfg
    method: MethodCfg
    ray: RayCfg
    studies: dict[str, StudyCfg]
    sweeps: dict[str, SweepCfg] = field(default_factory=dict)
    pretrain: dict[str, PretrainCfg] = field(default_factory=dict)


# --------------------------------------------------------------------------- variants

# Each variant is a set of MethodCfg overrides on the faithful default (= "dssn").
VARIANTS: dict[str, dict[str, Any]] = {
    "supervised": {"use_unlabeled": False, "teacher": False, "n_fp": 0},
    # the reference supervised.py: labeled images only, an epoch = one pass over the labeled list
    "supervised_ref": {"use_unlabeled": False, "teacher": False, "n_fp": 0, "epoch_pass": "labeled"},
    "unimatch": {
        "teacher": False,
        "n_fp": 1,
        "selection": "fixed",
        "threshold": 0.95,
        "con_img": False,
        "con_feat": False,
        "w_fp": 0.5,
        "intensity_ops": False,
    },
    "dssn": {},
    # Table 4: plain consistency / + dual-level contrastive / + CPLG / both (= dssn)
    "t4_plain": {"selection": "fixed", "threshold": 0.95, "con_img": False, "con_feat": False},
    "t4_contrastive": {"selection": "fixed", "threshold": 0.95},
    "t4_cplg": {"con_img": False, "con_feat": False},
    # Table 5: no contrastive / low (image-level) only / high (feature-level) only / both (= dssn)
    "t5_none": {"con_img": False, "con_feat": False},
    "t5_low": {"con_feat": False},
    "t5_high": {"con_img": False},
    # Fig. 4: fixed thresholds instead of CPLG
    "f4_fixed092": {"selection": "fixed", "threshold": 0.92},
    "f4_fixed096": {"selection": "fixed", "threshold": 0.96},
}


# --------------------------------------------------------------------------- loading


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"params: `{key}` must be {expected}, got {got!r}")


# Names that become folder names, MLflow experiment names and filter-string values.
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SAFE_TEXT = "a name of letters, digits, '_', '.' and '-' (it becomes a folder and an MLflow name)"


def _unique(values: list[Any], key: str) -> None:
    """Duplicates would make two trials of one cell (same folder, same result file)."""
    seen = [v for i, v in enumerate(values) if v in values[:i]]
    _check(not seen, key, "a list without duplicates", seen[0] if seen else None)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"params: `{key}` must be {' or '.join(_type_name(a) for a in args)}, got {value!r}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"params: `{key}` must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"params: `{key}` must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"params: `{key}` must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"params: `{key}` must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params: `{key}` must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"params: `{key}` must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"params: `{key}` must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"params: `{key}` must be a string, got {value!r}")
        return str(value)
    raise ConfigError(f"params: `{key}`: unsupported type {tp}")  # pragma: no cover


def build(cls: type, data: Any, key: str) -> Any:
    """Build dataclass `cls` from a mapping: unknown keys and missing required keys are errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"params: `{key}` must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"params: unknown key `{key}.{unknown[0]}` (allowed: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"params: missing key `{sub}` ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(key)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view (for Ray param spaces, MLflow params and resolved-config artifacts)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def merge(base: Any, overrides: dict[str, Any], key: str) -> Any:
    """A copy of dataclass `base` with `overrides` applied and re-validated."""
    return build(type(base), {**to_dict(base), **overrides}, key)


def method_for_variant(base: MethodCfg, variant: str, extra: dict[str, Any] | None = None) -> MethodCfg:
    if variant not in VARIANTS:
        raise ConfigError(f"params: unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
    return merge(base, {**(extra or {}), **VARIANTS[variant]}, f"method[{variant}]")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ConfigError naming the key on any problem."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params: file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"params: {path} is not valid YAML: {e}") from e
    params = build(Params, raw, "")
    for section in ("datasets", "studies", "sweeps", "pretrain"):
        for name in getattr(params, section):
            _check(_SAFE.fullmatch(name) is not None, f"{section}.{name}", _SAFE_TEXT, name)
    for name, study in params.studies.items():
        key = f"studies.{name}"
        for field_name in ("splits", "variants", "seeds", "backbones"):
            _unique(getattr(study, field_name), f"{key}.{field_name}")
        for s in study.seeds:
            _check(s >= 0, f"{key}.seeds", "integers >= 0", s)
        if study.dataset not in params.datasets:
            raise ConfigError(
                f"params: `{key}.dataset` must name a dataset in `datasets` "
                f"({', '.join(params.datasets) or 'none defined'}), got {study.dataset!r}"
            )
        ds = params.datasets[study.dataset]
        if study.protocol not in ds.protocols:
            raise ConfigError(
                f"params: `{key}.protocol` must be a protocol of `datasets.{study.dataset}.protocols` "
                f"({', '.join(ds.protocols)}), got {study.protocol!r}"
            )
        built = ds.protocols[study.protocol].names
        for s in study.splits:
            if s not in built:
                raise ConfigError(
                    f"params: `{key}.splits` entry {s!r} is not built by "
                    f"`datasets.{study.dataset}.protocols.{study.protocol}.names` {built}"
                )
        for v in study.variants:
            if v not in VARIANTS:
                raise ConfigError(
                    f"params: `{key}.variants` entry {v!r} is unknown (known: {', '.join(VARIANTS)})"
                )
        for v, only in study.variant_splits.items():
            if v not in study.variants:
                raise ConfigError(
                    f"params: `{key}.variant_splits.{v}` names a variant the study does not train "
                    f"(its variants: {study.variants})"
                )
            for s in only:
                if s not in study.splits:
                    raise ConfigError(
                        f"params: `{key}.variant_splits.{v}` entry {s!r} is not one of `{key}.splits` "
                        f"{study.splits}"
                    )
        _check(
            len(study.seeds) > 0 and len(study.variants) > 0 and len(study.splits) > 0,
            key,
            "non-empty splits, variants and seeds",
            study,
        )
        # Overrides must be valid for the sections they patch, on every backbone of the study.
        default_backbone = merge(params.model, study.overrides.model, f"{key}.overrides.model").backbone
        backbones = study.backbones or [default_backbone]
        for b in study.backbone_overrides:
            if b not in backbones:
                raise ConfigError(
                    f"params: `{key}.backbone_overrides.{b}` names a backbone the study does not train "
                    f"(its backbones: {backbones})"
                )
        for b in backbones:
            _, train, method = study.cell_sections(params, b, key)
            if method.warmup_epochs and method.warmup_epochs >= train.epochs:
                raise ConfigError(
                    f"params: `{key}`: method.warmup_epochs ({method.warmup_epochs}) must be below "
                    f"train.epochs ({train.epochs}), or the unlabeled branch never starts"
                )
            late = method.warmup_epochs + max(method.teacher_copy_epochs, method.strong_off_epochs)
            if method.use_unlabeled and late >= train.epochs:
                raise ConfigError(
                    f"params: `{key}` ({b}): method.warmup_epochs + teacher_copy_epochs/strong_off_epochs "
                    f"({late}) must be below train.epochs ({train.epochs}), or the EMA teacher never starts"
                )
    for name, sw in params.sweeps.items():
        key = f"sweeps.{name}"
        if sw.study not in params.studies:
            raise ConfigError(
                f"params: `{key}.study` must name a study in `studies` "
                f"({', '.join(params.studies)}), got {sw.study!r}"
            )
        study = params.studies[sw.study]
        if sw.split not in params.datasets[study.dataset].protocols[study.protocol].names:
            raise ConfigError(
                f"params: `{key}.split` {sw.split!r} is not built by "
                f"`datasets.{study.dataset}.protocols.{study.protocol}.names`"
            )
        if sw.variant not in VARIANTS:
            raise ConfigError(
                f"params: `{key}.variant` {sw.variant!r} is unknown (known: {', '.join(VARIANTS)})"
            )
    for name, pt in params.pretrain.items():
        for ds_name, ds in params.datasets.items():
            if ds.kind == "synthetic" and ds.source.synthetic.seed == pt.seed:  # type: ignore[union-attr]
                raise ConfigError(
                    f"params: `pretrain.{name}.seed` must differ from `datasets.{ds_name}.source.synthetic.seed` "
                    f"({pt.seed}): the pretext images must be disjoint from the benchmark's"
                )
    return params
