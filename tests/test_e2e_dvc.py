"""The real `dvc repro` on a tiny configuration, in a copy of the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def tiny_params(raw: dict) -> dict:
    raw["datasets"]["synthetic"]["synthetic"].update(n_train=96, n_val=12, size=32)
    raw["datasets"]["synthetic"]["splits"]["names"] = ["1_8", "1_4"]
    raw["ray"].update(num_cpus=2, cpus_per_trial=0.5)
    demo = raw["studies"]["demo"]
    demo.update(splits=["1_8", "1_4"], variants=["supervised", "dssn"], seeds=[0])
    demo["overrides"]["train"].update(
        epochs=2, iters_per_epoch=2, batch_l=2, batch_u=2, crop=32, eval_batch=12, log_images=2
    )
    demo["overrides"]["model"].update(aspp_channels=16, skip_channels=8, decoder_channels=16)
    return raw


def copy_repo(dest: Path) -> Path:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def env(work: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "DVC_"))}
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"
    e.update(
        DVC_NO_ANALYTICS="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(work),
    )
    return e


def dvc(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "dvc"
    return subprocess.run(
        [str(exe), *args], cwd=cwd, env=env(cwd), capture_output=True, text=True, timeout=900
    )


def test_dvc_repro_end_to_end(tmp_path):
    work = copy_repo(tmp_path / "repo")
    params = tiny_params(yaml.safe_load((work / "params.yaml").read_text()))
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    out = dvc(["repro"], work)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]

    # The table comes from MLflow: one row per labeled fraction, one column per variant.
    table = (work / "results/tables/demo.md").read_text()
    assert "1_8" in table and "1_4" in table and "supervised" in table and "dssn" in table
    assert (work / "results/tables/demo.csv").exists()
    assert (work / "results/plots/demo_miou_vs_labels.png").stat().st_size > 1000
    assert (work / "results/metrics.json").exists()
    assert len(list((work / "results/runs/demo").glob("*.json"))) == 4

    # MLflow: one parent run for the study, one child per trial with params, epochs and artifacts.
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dssn/demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("role") == "parent"]
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 4
    for r in trials:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert r.data.params["method.r"] == "0.96"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/miou_student")] == [1, 2]
        arts = {a.path for a in client.list_artifacts(r.info.run_id, "eval")}
        assert "eval/predictions.png" in arts
    dssn = [r for r in trials if r.data.tags["dssn.variant"] == "dssn"]
    assert all("val/miou_teacher" in r.data.metrics and "train/mask_ratio" in r.data.metrics for r in dssn)

    # Nothing changed -> nothing to reproduce, nothing retrained.
    again = dvc(["repro"], work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Running stage" not in again.stdout
    status = dvc(["status"], work)
    assert "up to date" in status.stdout
    assert len(client.search_runs([exp.experiment_id])) == 5
