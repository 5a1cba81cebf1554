"""MLflow: one experiment per study, a parent run per study, a child run per trial.

Everything goes through an explicit `MlflowClient(tracking_uri)`: no global MLflow state,
so Ray workers (other cwd, other process) can never log to the wrong store. A trial that
is resumed finds its run by (`ray.experiment`, `dssn.cell`) and continues it.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from PIL import Image

from pipeline.data.synthetic import voc_palette

MAX_BATCH = 900  # MLflow caps a log_batch at 1000 metrics


def resolve_tracking_uri(configured: str | None, root: Path) -> str:
    """MLFLOW_TRACKING_URI wins, then params, then an absolute sqlite file in the repo."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        return f"sqlite:///{(root / 'mlflow.db').resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(root / uri.removeprefix('sqlite:///')).resolve()}"
    return uri


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# MLflow 3 opens an experiment without this tag on its GenAI (traces) page; with it, on the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def source_tags(commit: str, entry: str = "stages/train.py") -> dict[str, str]:
    """The standard tags MLflow's UI shows as Source / User / Git commit."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return {
        "mlflow.source.name": entry,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        "mlflow.user": user,
    }


def ensure_experiment(uri: str, name: str, artifact_root: Path | None) -> str:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        for k, v in EXPERIMENT_KIND.items():
            if exp.tags.get(k) != v:
                client.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id
    location = None
    if artifact_root is not None and not uri.startswith("http"):
        location = (artifact_root / name.replace("/", "_")).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)


def repo_relative(value: str, root: Path | str | None) -> str:
    """`value` relative to `root` when it is a path inside it (a machine's absolute paths are not a
    setting of a run, and result files are git-tracked)."""
    prefix = f"{Path(root).resolve()}/" if root is not None else None
    return value.removeprefix(prefix) if prefix and value.startswith(prefix) else value


def clean_params(params: dict[str, Any], root: Path | None = None) -> dict[str, str]:
    """Params as the UI should show them: no `None` placeholders, paths under `root` made relative."""
    return {
        k: (repo_relative(v, root) if isinstance(v, str) else str(v))[:6000]
        for k, v in params.items()
        if v is not None
    }


def log_parent(uri: str, run_id: str, params: dict[str, str], metrics: dict[str, float]) -> None:
    """The study-level summary on the parent run: its shared resolved params and, per cell group,
    mean and std over seeds. A param an earlier run of the same parent logged stays as it was."""
    client = MlflowClient(tracking_uri=uri)
    have = client.get_run(run_id).data.params
    items = [Param(k, v) for k, v in params.items() if k not in have]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if _finite(v)]
    for i in range(0, len(ms), MAX_BATCH):
        client.log_batch(run_id, metrics=ms[i : i + MAX_BATCH])


def start_parent(uri: str, experiment_id: str, study: str, state_file: Any, tags: dict[str, str]) -> str:
    """Reuse the parent run recorded in `state_file` (a `pipeline.storage.Store`; a resumed study)
    or open a new one."""
    client = MlflowClient(tracking_uri=uri)
    recorded = state_file.read_text()
    if recorded:
        run_id = recorded.strip()
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage == "active":
                client.update_run(run_id, status="RUNNING")
                return run_id
        except Exception:  # noqa: BLE001 - a stale id: start a fresh parent
            pass
    run = client.create_run(
        experiment_id, run_name=study, tags={"role": "parent", "dssn.study": study, **tags}
    )
    state_file.write_text(run.info.run_id)
    return run.info.run_id


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri=uri).set_terminated(run_id, status)


def close_if_running(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """For a trial killed after writing its result file but before closing its run."""
    client = MlflowClient(tracking_uri=uri)
    if client.get_run(run_id).info.status == "RUNNING":
        client.set_terminated(run_id, status)


def mark_unfinished(uri: str, experiment_id: str, study: str, status: str = "KILLED") -> None:
    """Close trial runs left RUNNING (trials stopped early by ASHA end without a goodbye)."""
    client = MlflowClient(tracking_uri=uri)
    query = f"tags.`dssn.study` = '{study}' and tags.role = 'trial' and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], filter_string=query, max_results=10_000):
        client.set_terminated(run.info.run_id, status)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class TrialRun:
    """The MLflow child run of one trial."""

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        parent_id: str,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        resume_from: int | None = None,
    ):
        """`resume_from`: the epoch of the checkpoint the trial resumes from (None: from scratch).

        A resumed trial continues its run and never logs a (metric, step) it already has; a trial
        that starts from scratch replaces (soft-deletes) an earlier run of the same cell, so a cell
        has one run with one copy of each series.
        """
        self.client = MlflowClient(tracking_uri=uri)
        self.logged: set[tuple[str, int]] = set()
        found = self._find(experiment_id, tags)
        if found and resume_from is not None:  # a resumed or retried trial continues its run
            self.run_id = found[0].info.run_id
            for extra in found[1:]:
                self.client.delete_run(extra.info.run_id)
            self.client.update_run(self.run_id, status="RUNNING")
            self.set_tags({"ray.trial_id": tags["ray.trial_id"]})
            for key in self.client.get_run(self.run_id).data.metrics:
                self.logged.update((key, m.step) for m in self.client.get_metric_history(self.run_id, key))
            self.resumed = True
            return
        for old in found:  # trained again from scratch: the old series would be a second copy
            self.client.delete_run(old.info.run_id)
        run = self.client.create_run(
            experiment_id, run_name=name, tags={"role": "trial", "mlflow.parentRunId": parent_id, **tags}
        )
        self.run_id, self.resumed = run.info.run_id, False
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _find(self, experiment_id: str, tags: dict[str, str]) -> list:
        """The cell's runs, newest first: by its definition key when it has one (a cell reused
        across Ray experiments), else by (Ray experiment, cell)."""
        if tags.get("dssn.cell_key"):
            query = f"tags.`dssn.cell_key` = '{tags['dssn.cell_key']}'"
        else:
            query = f"tags.`ray.experiment` = '{tags['ray.experiment']}'"
        query += f" and tags.`dssn.cell` = '{tags['dssn.cell']}' and tags.role = 'trial'"
        return self.client.search_runs(
            [experiment_id], filter_string=query, max_results=1000, order_by=["attributes.start_time DESC"]
        )

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, step)
            for k, v in metrics.items()
            if _finite(v) and (k, step) not in self.logged
        ]
        self.logged.update((m.key, step) for m in items)
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=items[i : i + MAX_BATCH])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_json(self, obj: Any, artifact_file: str) -> None:
        self.log_bytes(json.dumps(obj, indent=2, default=str).encode(), artifact_file)

    def log_bytes(self, data: bytes, artifact_file: str) -> None:
        """`data` as the artifact `artifact_file` (folder/name) of this run."""
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(artifact_file).name
            path.write_bytes(data)
            parent = str(Path(artifact_file).parent)
            self.client.log_artifact(self.run_id, str(path), None if parent == "." else parent)

    def log_png(self, image: np.ndarray, artifact_file: str) -> None:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        self.log_bytes(buf.getvalue(), artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


def prediction_panel(images: list[np.ndarray], gts: list[np.ndarray], preds: list[np.ndarray]) -> np.ndarray:
    """Rows of [image | ground truth | prediction], labels coloured with the VOC palette."""
    pal = np.array(voc_palette(), dtype=np.uint8).reshape(256, 3)
    rows = [
        np.concatenate([img, pal[gt], pal[pr]], axis=1)
        for img, gt, pr in zip(images, gts, preds, strict=True)
    ]
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def confusion_png(confusion: list[list[int]], class_names: list[str]) -> np.ndarray:
    """Row-normalised confusion matrix as an RGB image (rendered with matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * k + 2), max(4, 0.4 * k + 2)), dpi=80)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    fig.tight_layout()
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img
