"""Ray Tune: one experiment per study, one trial per cell (split x backbone x variant x seed).

The experiment lives in Tune's storage (`paths.ray_results`: a folder, or a URI such as s3://...
that every node reaches; pipeline.storage), outside DVC's outputs. Trials share no file with the
driver: they checkpoint through `tune.report(checkpoint=...)`, resume from `tune.get_checkpoint()`
(or an earlier attempt's checkpoint), and their last checkpoint carries the result that the
driver writes to `results/runs/<study>/<cell>.json` (pipeline.studystate decides what is done).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, ModelCfg, Params, flatten, merge, method_for_variant
from pipeline.data.classes import class_names
from pipeline.io import write_json
from pipeline.storage import Store, is_uri
from pipeline.train import PlanError, TrialSpec, check_plan, fit

ROLE_KEYS = ("dssn.study", "dssn.cell", "ray.trial_id")


class ResourceError(RuntimeError):
    """The study asks for resources the Ray cluster does not have."""


@dataclass(frozen=True)
class StudyPaths:
    root: Path
    data: Path
    results: Path
    ray_results: str  # an absolute local path or a URI (pipeline.storage)
    artifacts: Path


def study_paths(params: Params, root: Path) -> StudyPaths:
    r = root.resolve()
    p = params.paths
    return StudyPaths(
        r,
        (r / p.data).resolve(),
        (r / p.results).resolve(),
        p.ray_results if is_uri(p.ray_results) else str((r / p.ray_results).resolve()),
        (r / p.mlflow_artifacts).resolve(),
    )


def split_info(split_dir: Path, split: str) -> dict[str, Any]:
    meta = split_dir / split / "split.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} is missing: run the `splits` stage first (dvc repro)")
    return json.loads(meta.read_text())


def study_specs(params: Params, study_name: str, root: Path) -> list[TrialSpec]:
    """Expand a study into one TrialSpec per cell; all paths absolute (trials run elsewhere)."""
    study = params.studies[study_name]
    ds = params.datasets[study.dataset]
    paths = study_paths(params, root)
    specs = []
    for split in study.splits:
        for backbone in study.backbones or [None]:
            model, train, method_base = study.cell_sections(params, backbone, f"studies.{study_name}")
            model = _local_weights(model, paths.root)
            backbone = model.backbone
            for variant in study.variants:
                if split not in study.variant_splits.get(variant, study.splits):
                    continue
                for seed in study.seeds:
                    cell = f"{split}-{backbone}-{variant}-s{seed}"
                    specs.append(
                        TrialSpec(
                            study=study_name,
                            cell=cell,
                            dataset_name=study.dataset,
                            dataset=ds,
                            class_names=class_names(ds.kind, ds.num_classes),
                            root=str(paths.data / "prepared" / study.dataset),
                            split_dir=str(paths.data / "splits" / study.dataset / study.protocol),
                            split=split,
                            protocol=study.protocol,
                            variant=variant,
                            seed=seed,
                            model=model,
                            train=train,
                            method=method_for_variant(method_base, variant),
                        )
                    )
    return specs


def _local_weights(model: ModelCfg, root: Path) -> ModelCfg:
    """A relative `model.pretrained` path is relative to the repo root (trials run elsewhere)."""
    src = model.pretrained
    if not src or src.startswith(("http://", "https://")) or Path(src).is_absolute():
        return model
    return dataclasses.replace(model, pretrained=str(root / src))


def connect_ray(num_cpus: int | None) -> dict[str, float]:
    """Join RAY_ADDRESS when set, else start a private local cluster; returns its resources.

    A private cluster listens on 127.0.0.1 only. `ray.init` resolves a node address of 127.0.0.1
    to the host's outward address (and Ray binds its servers to the node address), unless Ray is
    told this host runs no cluster, which is what `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` means; its
    token authentication stays on (Ray's default).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if not ray.is_initialized():
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        else:
            loopback_only()
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                object_store_memory=256 * 1024**2,
                log_to_driver=True,
                _node_ip_address="127.0.0.1",
            )
    return ray.cluster_resources()


def loopback_only() -> None:
    """Make Ray's node address resolve to 127.0.0.1 in this process and the ones it starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants  # read at import; set it too when ray came in earlier

    ray_constants.ENABLE_RAY_CLUSTER = False


def trial_resources(
    cluster: dict[str, float], cpus: float, gpus: float | None, workers: int = 1
) -> dict[str, float]:
    """Per-trial request; asking for GPUs the cluster lacks fails now instead of pending forever."""
    have_gpu = cluster.get("GPU", 0.0)
    have_cpu = cluster.get("CPU", 0.0)
    if gpus is None:
        gpus = float(workers) if have_gpu >= workers else 0.0
    if gpus > have_gpu:
        raise ResourceError(
            f"ray.gpus_per_trial = {gpus} but the Ray cluster has {have_gpu:g} GPU(s); "
            "set ray.gpus_per_trial to 0 (CPU) or join a GPU cluster with RAY_ADDRESS"
        )
    if cpus > have_cpu:
        raise ResourceError(f"ray.cpus_per_trial = {cpus} but the Ray cluster has {have_cpu:g} CPU(s)")
    if workers > 1 and gpus and gpus % workers:
        raise ResourceError(
            f"ray.gpus_per_trial = {gpus} must be a multiple of ray.workers_per_trial = {workers}"
        )
    return {"cpu": cpus, "gpu": gpus}


# The code whose change must retrain (the same files dvc.yaml lists as train deps).
TRAINING_CODE = (
    "config.py",
    "model.py",
    "train.py",
    "evaluate.py",
    "method",
    "data/datasets.py",
    "data/transforms.py",
)


def fingerprint(specs: list[TrialSpec]) -> str:
    """Digest of the training code and of every split list the specs read.

    Part of the Ray experiment's name, so a changed method or a rebuilt split never resumes
    (or reuses the results of) an experiment made with the old ones.
    """
    h = hashlib.sha256()
    pkg = Path(__file__).resolve().parent
    for entry in TRAINING_CODE:
        for f in sorted((pkg / entry).rglob("*.py")) if (pkg / entry).is_dir() else [pkg / entry]:
            h.update(f.relative_to(pkg).as_posix().encode())
            h.update(f.read_bytes())
    for split_dir, split in sorted({(s.split_dir, s.split) for s in specs}):
        for f in (
            Path(split_dir) / split / "labeled.txt",
            Path(split_dir) / split / "unlabeled.txt",
            Path(split_dir) / "val.txt",
        ):
            h.update(f.read_bytes() if f.exists() else b"missing")
    for weights in sorted(
        {s.model.pretrained.format(backbone=s.model.backbone) for s in specs if s.model.pretrained}
    ):
        if Path(weights).is_file():  # a re-pretrained backbone is a new experiment, like a new split
            h.update(Path(weights).read_bytes())
    return h.hexdigest()[:10]


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _trainable(
    config: dict, specs: dict[str, dict], tracking: dict[str, Any], workers: dict[str, Any]
) -> None:
    """One Tune trial = one cell; with `workers["n"]` > 1 it drives a DDP TorchTrainer of that many workers.

    The trial touches no file of the driver: it resumes from `tune.get_checkpoint()` (a retry on
    another node) or from the last checkpoint of an earlier attempt (a killed driver), uploads its
    weights to the storage, and hands its result to the driver in its last report.
    """
    from ray import tune

    spec = TrialSpec.from_dict(specs[config["cell"]])
    if "r" in config or "tau_low" in config:  # a sweep trial: CPLG parameters come from the search
        r, tau = float(config.get("r", spec.method.r)), float(config.get("tau_low", spec.method.tau_low))
        spec = dataclasses.replace(
            spec,
            cell=f"{spec.cell}-r{r:.4f}-t{tau:.4f}",
            method=merge(spec.method, {"r": r, "tau_low": tau}, "sweep"),
        )
    trial_id = tune.get_context().get_trial_id()
    if workers["n"] <= 1:
        _run_cell(spec, trial_id, tracking, tune.report, tune.get_checkpoint)
        return

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    exp = Store.at(tracking["storage"]) / tracking["experiment"]
    per_worker = {"CPU": workers["cpu"], **({"GPU": workers["gpu"]} if workers["gpu"] else {})}
    TorchTrainer(
        _ddp_worker,
        train_loop_config={"spec": spec.to_dict(), "trial_id": trial_id, "tracking": tracking},
        scaling_config=ScalingConfig(
            num_workers=workers["n"], use_gpu=bool(workers["gpu"]), resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=f"{tracking['experiment']}-{spec.cell}",  # stable: a new attempt resumes it
            storage_path=(exp / "ddp").path,
            storage_filesystem=exp.fs,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()],
        ),
    ).fit()


def _ddp_worker(config: dict) -> None:
    """One rank of a multi-GPU trial (Ray Train sets up the process group and the device)."""
    import ray.train
    import ray.train.torch

    from pipeline.train import Dist

    ctx = ray.train.get_context()
    dist = Dist(ctx.get_world_rank(), ctx.get_world_size())
    _run_cell(
        TrialSpec.from_dict(config["spec"]),
        config["trial_id"],
        config["tracking"],
        ray.train.report,
        ray.train.get_checkpoint,
        dist=dist,
        device=ray.train.torch.get_device(),
    )


RESULT_FILE = "dssn_result.json"  # in a trial's last checkpoint: its result file's content


def _node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): which machine ran (or resumed) a cell."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def resume_point(ckpt: Any, earlier: list[str], fs: Any, cell: str) -> tuple[Any, dict | None, dict | None]:
    """(checkpoint, resume state, finished result) a trial starts from: Tune's own checkpoint on a
    retry within this attempt (complete by construction), else the newest earlier-attempt
    checkpoint that opens (a killed driver; an upload cut short is skipped), else nothing."""
    from ray.tune import Checkpoint

    if ckpt is not None:
        return (ckpt, *_open_checkpoint(ckpt))
    for path in earlier:
        try:
            ckpt = Checkpoint(path, filesystem=fs)
            return (ckpt, *_open_checkpoint(ckpt))
        except Exception as e:  # noqa: BLE001 - a truncated or missing file: the next older one
            print(f"[{cell}] skipping an incomplete checkpoint {path}: {e}", flush=True)
    return None, None, None


def _open_checkpoint(ckpt: Any) -> tuple[dict | None, dict | None]:
    """(resume state, None) of an unfinished cell, or (None, result) of a finished one."""
    with ckpt.as_directory() as d:
        if (Path(d) / RESULT_FILE).is_file():
            return None, json.loads((Path(d) / RESULT_FILE).read_text())
        return torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False), None


STAGING_MAX_AGE_S = 24 * 3600  # a checkpoint staging folder older than this was left by a kill


def _report_with(report, metrics: dict[str, Any], files: dict[str, Any] | None) -> None:
    """Report `metrics`, with a checkpoint of `files` (name -> object, torch-saved or JSON) if any;
    Tune uploads it to the storage before `report` returns, so the folder is only staging.

    A trial killed mid-upload leaves its staging folder behind (a resume state is 3x the weights),
    so folders of ours older than a day are removed first."""
    if files is None:
        report(metrics)
        return
    import shutil
    import tempfile
    import time

    from ray.tune import Checkpoint

    base = Path(tempfile.gettempdir())
    for old in base.glob("dssn-ckpt-*"):
        try:
            if time.time() - old.stat().st_mtime > STAGING_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    with tempfile.TemporaryDirectory(prefix="dssn-ckpt-", dir=base) as tmp:
        for name, obj in files.items():
            if name.endswith(".json"):
                write_json(Path(tmp) / name, obj)
            else:
                torch.save(obj, Path(tmp) / name)
        report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _run_cell(
    spec: TrialSpec,
    trial_id: str,
    tracking: dict[str, Any],
    report,
    get_checkpoint,
    dist=None,
    device: torch.device | None = None,
) -> None:
    """Fit one cell; rank 0 mirrors every epoch to MLflow and to a Tune checkpoint, every rank reports."""

    from pipeline.tracking import (
        TrialRun,
        clean_params,
        close_if_running,
        confusion_png,
        repo_relative,
        source_tags,
    )
    from pipeline.train import Dist

    dist = dist or Dist()
    exp = Store.at(tracking["storage"]) / tracking["experiment"]
    cell_dir = exp / "cells" / spec.cell  # best/last student weights: outputs, not resume state
    ckpt, resume, finished = resume_point(
        get_checkpoint(), tracking.get("resume_from", {}).get(spec.cell, []), exp.fs, spec.cell
    )
    if finished is not None:  # done in an earlier attempt whose driver died before writing it
        if dist.main:
            close_if_running(tracking["uri"], finished["mlflow_run_id"])
        epoch = {"epoch": finished.get("final/epochs", 0)}
        _report_with(report, epoch, {RESULT_FILE: finished} if dist.main else None)
        return
    resumed_from = None if resume is None else f"{ckpt.path} (epoch {int(resume['epoch'])})"
    if resume is not None and dist.main:
        print(f"[{spec.cell}] resuming at epoch {int(resume['epoch'])} from {ckpt.path}", flush=True)
    best = {"miou": (resume or {}).get("best", {}).get("student", {}).get("miou", float("-inf"))}
    run = None
    if dist.main:
        tags = {
            "dssn.study": spec.study,
            "dssn.cell": spec.cell,
            "dssn.dataset": spec.dataset_name,
            "dssn.protocol": spec.protocol,
            "dssn.split": spec.split,
            "dssn.backbone": spec.model.backbone,
            "dssn.variant": spec.variant,
            "dssn.seed": str(spec.seed),
            "ray.trial_id": trial_id,
            "ray.experiment": tracking["experiment"],
            **({"dssn.cell_key": k} if (k := tracking.get("cell_keys", {}).get(spec.cell)) else {}),
            "ray.workers": str(dist.world),
            "ray.node_id": _node_id(),
            "git.commit": tracking["git_commit"],
            "dvc.stage": tracking["dvc_stage"],
        }
        info = split_info(Path(spec.split_dir), spec.split)
        tags.update({"dssn.n_labeled": str(info["n_labeled"]), "dssn.n_train": str(info["n_train"])})
        tags.update(source_tags(tracking["git_commit"], f"dvc.yaml:{tracking['dvc_stage'] or spec.study}"))
        run = TrialRun(
            tracking["uri"],
            tracking["experiment_id"],
            tracking["parent_id"],
            spec.cell,
            tags,
            clean_params(flatten(applied_config(spec, device)), tracking.get("root")),
            resume_from=None if resume is None else int(resume["epoch"]),
        )
        if resumed_from:
            run.set_tags({"ray.resumed_from": resumed_from, "ray.node_id": tags["ray.node_id"]})
    # what the result carries for the report (a resumed cell starts from its saved history)
    history = (resume or {}).get("history") or []
    latest: dict[str, Any] = {"metrics": dict(history[-1]) if history else {}, "history": history}

    def tune_metrics(metrics: dict[str, float]) -> dict[str, float]:
        skip = ("val_class", "pseudo_kept", "pl_threshold", "pl_align")
        return {k: v for k, v in metrics.items() if not k.startswith(skip)}

    try:

        def on_epoch(epoch: int, metrics: dict[str, float], state: dict) -> None:
            latest["metrics"], latest["history"] = {**latest["metrics"], **metrics}, state["history"]
            files = None
            if run is not None:
                run.log_metrics(metrics, step=epoch)
                miou = metrics.get("val/miou_student")
                if miou is not None and miou > best["miou"]:  # best student weights
                    best["miou"] = miou
                    _put(state["student"], cell_dir / "best.pt")
                files = {"state.pt": state}
            _report_with(report, tune_metrics(metrics), files)

        summary = fit(spec, on_epoch, resume, dist=dist, device=device)
        if run is None:  # every rank reports as often as rank 0
            report({})
            return
        student, confusion = summary.pop("_student"), summary.pop("_confusion")
        run.log_metrics(summary, step=int(summary["final/epochs"]))
        run.log_json(spec.to_dict(), "config/resolved.json")
        if confusion is not None:
            run.log_json({"classes": spec.class_names, "matrix": confusion}, "eval/confusion.json")
            run.log_png(confusion_png(confusion, spec.class_names), "eval/confusion.png")
        panel = _predictions(student, spec)
        if panel is not None:
            run.log_png(panel, "eval/predictions.png")
        best_file, last_file = cell_dir / "best.pt", cell_dir / "last.pt"
        _put(student.state_dict(), last_file)
        run.set_tags({"checkpoint.best": best_file.uri, "checkpoint.last": last_file.uri})
        if spec.train.log_checkpoints:
            for f in (best_file, last_file):
                if f.exists():
                    run.log_bytes(f.fs.open_input_stream(f.path).read(), f"checkpoints/{f.name}")
        out = {
            "ray_experiment": tracking["experiment"],
            "cell": spec.cell,
            **({"cell_key": key} if (key := tracking.get("cell_keys", {}).get(spec.cell)) else {}),
            "mlflow_run_id": run.run_id,
            "ray_trial_id": trial_id,
            "split": spec.split,
            "variant": spec.variant,
            "seed": spec.seed,
            "backbone": spec.model.backbone,
            "method.r": spec.method.r,
            "method.tau_low": spec.method.tau_low,
            "checkpoint_best": repo_relative(best_file.uri, tracking.get("root"))
            if best_file.local
            else best_file.uri,
            **{k: v for k, v in summary.items() if not k.startswith("final/iou_")},
            # the report is built from these (DVC-tracked), MLflow being the browsing mirror
            "tags": tags,
            "metrics": {**latest["metrics"], **summary},
            "history": [{k: v for k, v in h.items() if k in HISTORY_KEYS} for h in latest["history"]],
        }
        # The driver writes the result file from this report; the checkpoint (the result alone)
        # replaces the resume state (num_to_keep=1), dead weight once the cell is done.
        _report_with(report, tune_metrics(latest["metrics"]), {RESULT_FILE: out})
        run.finish("FINISHED")
    except SystemExit:  # Tune stopped the trial (an ASHA decision): not a failure
        if run is not None:
            run.finish("KILLED")
        raise
    except BaseException:
        if run is not None:
            run.finish("FAILED")
        raise


# per-epoch series kept in a cell's result file (the report's learning curves)
HISTORY_KEYS = (
    "epoch",
    "val/miou_student",
    "val/miou_teacher",
    "train/loss",
    "train/loss_s",
    "train/mask_ratio",
    "train/mask_ratio_teacher",
)


def applied_config(spec: TrialSpec, device: torch.device | None = None) -> dict[str, Any]:
    """The trial's resolved config with the fast-path switches as they take effect: bf16 autocast,
    channels-last and compile are CUDA-only (unless `train.fast_path_on_cpu`), so a CPU trial runs
    (and reports) them off."""
    from pipeline.train import fast_path_applies, pick_device

    d = spec.to_dict()
    if not fast_path_applies(spec.train, device or pick_device(spec.train)):
        d["train"].update(amp=False, channels_last=False, compile=False)
    return d


def shared_params(specs: list[TrialSpec], root: Path) -> dict[str, str]:
    """The settings every cell of a study shares (the parent run's params)."""
    from pipeline.tracking import clean_params

    flat = [flatten(s.to_dict()) for s in specs]
    common = {k: v for k, v in flat[0].items() if all(f.get(k) == v for f in flat[1:])}
    common.pop("cell", None)
    return clean_params(common, root)


def summary_metrics(summaries: list[dict[str, Any]]) -> dict[str, float]:
    """Per cell group (split, backbone, variant): mean and std over seeds of the paper's number."""
    groups: dict[str, list[float]] = {}
    for s in summaries:
        v = s.get("final/miou_best")
        if v is not None:
            groups.setdefault(f"{s['split']}-{s['backbone']}-{s['variant']}", []).append(float(v))
    out = {}
    for g, vals in groups.items():
        out[f"miou_best/{g}/mean"] = float(np.mean(vals))
        out[f"miou_best/{g}/std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        out[f"miou_best/{g}/seeds"] = float(len(vals))
    return out


def trial_name(trial: Any) -> str:
    """Tune's name for a trial: its cell (and a sweep's r, tau_low), not `_trainable_<hash>`."""
    cfg = trial.config
    name = str(cfg.get("cell", trial.trial_id))
    if "r" in cfg and "tau_low" in cfg:
        name += f"-r{float(cfg['r']):.4f}-t{float(cfg['tau_low']):.4f}"
    return name


def trial_dirname(trial: Any) -> str:
    return f"{trial_name(trial)}_{trial.trial_id}"


def ResultWriter(runs_dir: Path, fs: Any) -> Any:  # noqa: N802 - builds a Tune callback (ray imported lazily)
    """A driver-side Tune callback: a trial's last checkpoint holds its result, written here, on the
    machine that runs `dvc repro`, as soon as Tune registers it (a cell done survives a killed
    driver). `fs`: the storage's filesystem (a DDP trial's checkpoints are only paths)."""
    from ray import tune

    def collect(path: str | None, filesystem: Any) -> None:
        if not path:
            return
        found = Store(filesystem, posixpath.join(path, RESULT_FILE), "").read_text()
        if found:
            out = json.loads(found)
            write_json(Path(runs_dir) / f"{out['cell']}.json", out)

    class _Writer(tune.Callback):
        def on_checkpoint(
            self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any
        ) -> None:
            collect(checkpoint.path, checkpoint.filesystem)

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            collect(result.get("checkpoint_path"), fs)  # a DDP trial (TuneReportCallback)

    return _Writer()


_TRIAL_DIR = re.compile(r"^(?P<cell>.+?)_[0-9a-f]{5,8}(_\d{5})?$")  # trial_dirname: <cell>_<trial id>


def last_checkpoints(exp_dir: Store, cells: list[str]) -> dict[str, list[str]]:
    """Each cell's Tune checkpoints over the earlier attempts, newest first: where a new attempt
    resumes it. The newest may be one a killed upload left incomplete (Tune registers, and only
    then prunes, a checkpoint once it is uploaded), so the trial falls back to the next."""
    from pipeline.studystate import ATTEMPTS

    found: dict[str, list[str]] = {}
    attempts = [a for a in (exp_dir / ATTEMPTS).children() if a.name.isdigit()]
    for attempt in sorted(attempts, key=lambda a: int(a.name)):
        for trial_dir in attempt.children():
            m = _TRIAL_DIR.match(trial_dir.name)
            if m is None or m["cell"] not in cells:
                continue
            ckpts = sorted(c.path for c in trial_dir.children() if c.name.startswith("checkpoint_"))
            found[m["cell"]] = ckpts[::-1] + found.get(m["cell"], [])  # later attempts first
    return {cell: paths for cell, paths in found.items() if paths}


def _put(obj: Any, dest: Store) -> None:
    """torch-save `obj` to the storage (atomically on a local disk)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dssn-put-") as tmp:
        torch.save(obj, Path(tmp) / dest.name)
        dest.upload(Path(tmp) / dest.name)


def _predictions(student: torch.nn.Module, spec: TrialSpec) -> np.ndarray | None:
    """[image | ground truth | prediction] for the first few validation images."""
    from pipeline.data.datasets import SegList
    from pipeline.data.transforms import normalize
    from pipeline.tracking import prediction_panel

    n = spec.train.log_images
    if n <= 0:
        return None
    val = SegList(Path(spec.root), Path(spec.split_dir) / "val.txt", "val")
    device = next(student.parameters()).device
    student.eval()
    imgs, gts, preds = [], [], []
    with torch.no_grad():
        for i in range(min(n, len(val))):
            s = val[i]
            logits = student(normalize(s["image"][None].to(device).float() / 255.0))
            imgs.append(s["image"].permute(1, 2, 0).numpy())
            gts.append(s["mask"].numpy().astype(np.uint8))
            preds.append(logits.argmax(1)[0].cpu().numpy().astype(np.uint8))
    return prediction_panel(imgs, gts, preds)


def run_study(params: Params, study_name: str, root: Path) -> list[dict[str, Any]]:
    """Run (or resume) every cell of a study on Ray; returns the per-cell final summaries."""
    specs = study_specs(params, study_name, root)
    paths = study_paths(params, root)
    out = run_cells(params, root, study_name, specs, paths.results / "runs" / study_name)
    return out["summaries"]


def search_limit(search_alg: Any, *limits: int | None) -> tuple[Any, int | None]:
    """The tightest of the concurrency limits, applied once: Tune refuses `max_concurrent_trials`
    next to a searcher that is already a ConcurrencyLimiter with another limit, so a searcher is
    wrapped here and Tune gets no limit of its own; without a searcher Tune applies it."""
    set_limits = [n for n in limits if n]
    limit = min(set_limits) if set_limits else None
    if search_alg is None or limit is None:
        return search_alg, limit
    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(search_alg, max_concurrent=limit), None


def preflight(specs: list[TrialSpec], workers: int, gpus: bool | None) -> None:
    """Refuse every cell that could not train (`train.check_plan`) before any work starts.

    A loader that yields no batch used to spin inside the trial at 100 % CPU, and one image per
    device used to die in a BatchNorm traceback inside Ray, retried; both are settled by the list
    sizes and the batch, so the driver refuses them in one line (exit 2) before Ray starts and
    before any result file or MLflow run is touched. `gpus`: whether the trial's workers get GPUs
    (SyncBatchNorm with several workers), None while unknown (`ray.gpus_per_trial: null` before the
    cluster is seen).
    """
    problems = []
    for spec in specs:
        try:
            check_plan(spec, workers, sync_bn=gpus)
        except PlanError as e:
            problems.append(str(e))
    if problems:
        more = f" (and {len(problems) - 1} more cells)" if len(problems) > 1 else ""
        raise ConfigError(f"{problems[0]}{more}")


def run_cells(
    params: Params,
    root: Path,
    name: str,
    specs: list[TrialSpec],
    runs_dir: Path,
    search: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One Ray Tune experiment over `specs` (a grid), or a search around them when `search` is set.

    `search` = {"space": {param: tune domain}, "num_samples": n, "scheduler": ..., "search_alg": ...,
    "metric": ..., "mode": ...}: exploration sweeps (ASHA/Optuna) whose trials may be stopped early.
    """
    from pipeline.preflight import check_before_work
    from pipeline.studystate import commit, reconcile, settle_runs
    from pipeline.tracking import (
        ensure_experiment,
        finish_run,
        git_commit,
        log_parent,
        resolve_tracking_uri,
        source_tags,
        start_parent,
    )

    paths = study_paths(params, root)
    for spec in specs:  # fail before starting Ray when a split is missing
        split_info(Path(spec.split_dir), spec.split)
    uri = resolve_tracking_uri(params.paths.mlflow_uri, paths.root)
    check_before_work(params, uri, runs_dir, paths)  # unreachable or unwritable places: before any work
    n_workers = params.ray.workers_per_trial
    gpus = params.ray.gpus_per_trial
    preflight(specs, n_workers, None if gpus is None else gpus > 0)  # before Ray, MLflow, result files
    spec_dicts = {s.cell: s.to_dict() for s in specs}
    search_id = None if search is None else search["id"]
    exp_name = f"{name}-{_hash([spec_dicts, search_id, fingerprint(specs)])}"
    # A finished cell is reused while its own definition holds (spec, training code, its split lists
    # and weights): adding a seed or a variant to a study must not retrain the cells already done.
    cell_keys = {s.cell: _hash([spec_dicts[s.cell], search_id, fingerprint([s])]) for s in specs}
    exp_dir = Store.at(paths.ray_results) / exp_name
    state = reconcile(runs_dir, sorted(spec_dicts), cell_keys, exp_name, search is not None)
    settle_runs(uri, f"dssn/{name}", state)  # no run is left RUNNING by a killed driver
    if search is None and not state.todo:  # every cell is done: nothing for Ray to do
        commit(runs_dir, set(spec_dicts), exp_dir, None)
        return {
            "summaries": [state.done[c] for c in sorted(spec_dicts)],
            "results": None,
            "experiment": exp_name,
        }

    cluster = connect_ray(params.ray.num_cpus)
    resources = trial_resources(cluster, params.ray.cpus_per_trial, params.ray.gpus_per_trial, n_workers)
    preflight(specs, n_workers, resources["gpu"] > 0)  # now the workers' device is known
    workers = {"n": n_workers, "cpu": resources["cpu"] / n_workers, "gpu": resources["gpu"] / n_workers}
    max_concurrent = params.ray.max_concurrent
    if n_workers > 1:  # the trial itself only drives its workers; cap trials by what the workers need
        fits = int(cluster.get("CPU", 0) // resources["cpu"])
        if resources["gpu"]:
            fits = min(fits, int(cluster.get("GPU", 0) // resources["gpu"]))
        max_concurrent = max(1, min(max_concurrent or fits, fits))
        resources = {"cpu": 0.01, "gpu": 0}

    exp_id = ensure_experiment(uri, f"dssn/{name}", paths.artifacts)
    exp_dir.mkdir()
    commit_id = git_commit(paths.root)
    parent = start_parent(
        uri,
        exp_id,
        name,
        exp_dir / "mlflow_parent_run_id",
        {
            "git.commit": commit_id,
            "dvc.stage": os.environ.get("DVC_STAGE", ""),
            "ray.experiment": exp_name,
            "dssn.n_cells": str(len(specs)),
            **source_tags(commit_id, f"dvc.yaml:{os.environ.get('DVC_STAGE') or name}"),
        },
    )
    try:
        out = _fit_and_verify(
            params,
            name,
            specs,
            spec_dicts,
            search,
            state.todo,
            runs_dir,
            exp_dir,
            max_concurrent,
            resources,
            workers,
            {
                "uri": uri,
                "experiment_id": exp_id,
                "parent_id": parent,
                "git_commit": commit_id,
                "dvc_stage": os.environ.get("DVC_STAGE", ""),
                "experiment": exp_name,
                "storage": paths.ray_results,
                "resume_from": {} if search is not None else last_checkpoints(exp_dir, state.todo),
                "cell_keys": cell_keys,
                "root": str(paths.root),
            },
        )
    except BaseException as e:  # the parent is never left RUNNING; the next run reopens it
        finish_run(uri, parent, "FAILED" if isinstance(e, Exception) else "KILLED")
        raise
    log_parent(uri, parent, shared_params(specs, paths.root), summary_metrics(out["summaries"]))
    finish_run(uri, parent, "FINISHED")
    keep = (
        set(spec_dicts)
        if search is None
        else {f.stem for f in runs_dir.glob("*.json")} - {f.stem for f in state.stale}
    )
    commit(runs_dir, keep, exp_dir, out.pop("attempt"))  # destructive steps only now
    return out


def _fit_and_verify(
    params: Params,
    name: str,
    specs: list[TrialSpec],
    spec_dicts: dict[str, dict],
    search: dict[str, Any] | None,
    todo: list[str],
    runs_dir: Path,
    exp_dir: Store,
    max_concurrent: int | None,
    resources: dict[str, float],
    workers: dict[str, Any],
    tracking: dict[str, Any],
) -> dict[str, Any]:
    """One Tune run over the cells still to do; raises unless every cell has a current result."""
    from ray import tune

    from pipeline.studystate import ATTEMPTS, current_result
    from pipeline.tracking import mark_unfinished

    runs_dir.mkdir(parents=True, exist_ok=True)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, specs=spec_dicts, tracking=tracking, workers=workers), resources
    )
    attempt = None
    # a searcher's state is its own
    if search is not None and tune.Tuner.can_restore(exp_dir.path, storage_filesystem=exp_dir.fs):
        tuner = tune.Tuner.restore(
            exp_dir.path, trainable, resume_errored=True, storage_filesystem=exp_dir.fs
        )
    else:
        if search is None:
            # never restored: Ray's record of TERMINATED trials must not hide a cell without a result
            from pipeline.studystate import next_attempt

            attempt = next_attempt(exp_dir)
            space = {"cell": tune.grid_search(todo)}
            tune_cfg = tune.TuneConfig(
                max_concurrent_trials=max_concurrent,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_dirname,
            )
            run_name, storage = attempt, exp_dir / ATTEMPTS
        else:
            space = {"cell": sorted(spec_dicts)[0], **search["space"]}  # searchers take no grid axes
            search_alg, limit = search_limit(
                search.get("search_alg"), search.get("max_concurrent"), max_concurrent
            )
            tune_cfg = tune.TuneConfig(
                metric=search["metric"],
                mode=search["mode"],
                num_samples=search["num_samples"],
                scheduler=search.get("scheduler"),
                search_alg=search_alg,
                max_concurrent_trials=limit,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_dirname,
            )
            run_name, storage = exp_dir.name, Store(exp_dir.fs, posixpath.dirname(exp_dir.path), "")
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune_cfg,
            run_config=tune.RunConfig(
                name=run_name,
                storage_path=storage.path,
                storage_filesystem=exp_dir.fs,
                verbose=1,
                failure_config=tune.FailureConfig(max_failures=params.ray.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),  # the latest: what a retry resumes
                callbacks=[ResultWriter(runs_dir, exp_dir.fs)],
            ),
        )
    results = tuner.fit()
    mark_unfinished(
        tracking["uri"], tracking["experiment_id"], name, "KILLED"
    )  # stopped early by a scheduler
    summaries, missing = [], []
    for cell in sorted(spec_dicts) if search is None else []:
        done = current_result(
            runs_dir / f"{cell}.json", tracking["cell_keys"].get(cell), tracking["experiment"]
        )
        if done is not None:
            summaries.append(done)
        else:
            missing.append(cell)
    if missing or results.num_errors:
        errs = "; ".join(str(e).splitlines()[0] for e in results.errors[:3])
        raise RuntimeError(
            f"{name}: {len(missing)} of {len(spec_dicts)} trials did not finish "
            f"({', '.join(missing[:5])}), {results.num_errors} errored. "
            f"Re-run to resume them. First errors: {errs}"
        )
    return {
        "summaries": summaries,
        "results": results,
        "experiment": tracking["experiment"],
        "attempt": attempt,
    }
