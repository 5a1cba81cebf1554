"""The real `dvc repro` on a tiny configuration, in a copy of the repository."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO


def tiny_params(raw: dict) -> dict:
    raw["datasets"]["synthetic"]["source"]["synthetic"].update(n_train=96, n_val=12, size=32)
    raw["datasets"]["synthetic"]["protocols"]["blended"]["names"] = ["1_8", "1_4"]
    raw["ray"].update(num_cpus=2, cpus_per_trial=0.5)
    demo = raw["studies"]["demo"]
    # both variants on both splits (the demo trains DSSN at its smallest fraction only)
    demo.update(splits=["1_8", "1_4"], variants=["supervised", "dssn"], seeds=[0], variant_splits={})
    demo["overrides"]["train"].update(
        epochs=2, iters_per_epoch=2, batch_l=2, batch_u=2, crop=32, eval_batch=12, log_images=2
    )
    demo["overrides"]["model"].update(aspp_channels=16, skip_channels=8, decoder_channels=16)
    return raw


def with_ablation_and_sweep(raw: dict) -> dict:
    """Add a Table-4-style ablation study (warm-started from a pretext backbone, published into a
    document) and an ASHA/Optuna exploration sweep, all tiny."""
    demo = raw["studies"]["demo"]
    raw["pretrain"] = {
        "tiny": {
            "backbone": "resnet18",
            "seed": 5,
            "n_images": 32,
            "n_val": 8,
            "size": 32,
            "steps": 3,
            "batch": 8,
        }
    }
    overrides = copy.deepcopy(demo["overrides"])
    overrides["model"]["pretrained"] = "data/pretrained/tiny.pt"
    raw["studies"]["ablation"] = {
        "dataset": "synthetic",
        "protocol": "blended",
        "splits": ["1_4"],
        "variants": ["t4_plain", "t4_cplg"],
        "seeds": [0],
        "publish": "docs/ablation.md",
        "overrides": overrides,
    }
    raw["sweeps"] = {
        "explore": {
            "study": "demo",
            "split": "1_4",
            "variant": "dssn",
            "seeds": [0],
            "r": [0.5, 0.99],
            "tau_low": [0.3, 0.95],
            "mode": "explore",
            "search": "optuna",
            "num_samples": 6,
            "grace_period": 1,
            "reduction_factor": 2,
            # long enough that trials differ, so ASHA has something to cut
            "overrides": {"train": {"epochs": 3, "iters_per_epoch": 6, "lr": 0.01}},
        }
    }
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


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path):
    work = copy_repo(tmp_path / "repo")
    params = with_ablation_and_sweep(tiny_params(yaml.safe_load((work / "params.yaml").read_text())))
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
    # The background-only level of the val set is in every result file and above the table (the
    # demo's cells are judged against it; 4 steps cannot clear it, so only its presence is checked
    # here: tests/test_dvc_experiments.py checks the committed demo results against it).
    floors = {
        round(json.loads(p.read_text())["final/miou_background_only"], 6)
        for p in (work / "results/runs/demo").glob("*.json")
    }
    assert len(floors) == 1 and 0 < floors.pop() < 100 / 7
    assert "background only:" in table

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
    # The DSSN step's image-level branch is logged every epoch (loss_s > 0 and the teacher's kept classes
    # need a model that has learned something: 4 steps from scratch cannot; see README "The demo").
    for r in dssn:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "train/loss_s")] == [1, 2]
        assert r.data.params["method.ema_keep"] == "0.98"  # the demo's keep, matched to its steps
        assert r.data.params["train.flush_denormal"] == "True"

    # The ablation study is a table of its own; the exploration sweep stopped some trials early.
    ablation = (work / "results/tables/ablation.md").read_text()
    assert "t4_plain" in ablation and "t4_cplg" in ablation
    assert "Per-class IoU" in ablation  # (pseudo-label table: NaN in 4 steps, covered by unit tests)
    assert json.loads((work / "data/pretrained/tiny.json").read_text())["steps"] == 3
    abl = client.search_runs(
        [client.get_experiment_by_name("dssn/ablation").experiment_id], "tags.role = 'trial'"
    )
    assert {r.data.params["model.pretrained"] for r in abl} == {"data/pretrained/tiny.pt"}  # no machine path
    doc = (work / "docs/ablation.md").read_text()
    assert "<!-- begin generated: ablation -->" in doc and "t4_cplg" in doc
    assert (work / "docs/ablation/ablation_curves.png").stat().st_size > 1000
    trials = pd.read_csv(work / "results/sweeps/explore/trials.csv")
    # Which trials ASHA stops is its call on tiny-model noise and arrival order (none, some), so the
    # stop itself is tested with a scheduler that must stop (test_orchestrate); here: consistency.
    assert len(trials) == 6 and trials["epochs"].between(1, 3).all()
    assert (trials["stopped_early"] == (trials["epochs"] < 3)).all()
    assert trials["r"].between(0.5, 0.99).all() and trials["tau_low"].between(0.3, 0.95).all()
    best = json.loads((work / "results/sweeps/explore/best.json").read_text())
    full = trials[~trials["stopped_early"]]  # the first trial at a rung is never stopped
    assert best["mode"] == "explore" and best["r"] in set(full["r"])
    assert best["miou"] == pytest.approx(full["miou"].max())
    assert (work / "results/sweeps/explore/heatmap.png").exists()
    sweep_exp = client.get_experiment_by_name("dssn/sweep-explore")
    statuses = [
        r.info.status
        for r in client.search_runs([sweep_exp.experiment_id])
        if r.data.tags.get("role") == "trial"
    ]
    assert sorted(statuses) == sorted(["KILLED" if s else "FINISHED" for s in trials["stopped_early"]])

    # Nothing changed -> nothing to reproduce, nothing retrained.
    again = dvc(["repro"], work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Running stage" not in again.stdout
    status = dvc(["status"], work)
    assert "up to date" in status.stdout
    assert len(client.search_runs([exp.experiment_id])) == 5
    assert len(client.search_runs([sweep_exp.experiment_id])) == 7


def test_paper_params_one_train_stage_per_table_in_order(tmp_path):
    """configs/paper.yaml as the params: one train stage per paper artefact, stages in DAG order."""
    from pipeline.config import load_params

    params = load_params(REPO / "configs" / "paper.yaml")
    assert set(params.studies) == {"table1", "table2", "table3", "table4", "table5", "fig3", "fig4"}
    work = copy_repo(tmp_path / "repo")
    shutil.copy(work / "configs" / "paper.yaml", work / "params.yaml")
    (work / "dvc.lock").unlink(missing_ok=True)
    stages = dvc(["stage", "list"], work)
    assert stages.returncode == 0, stages.stderr
    names = [line.split()[0] for line in stages.stdout.splitlines() if line.strip()]
    assert [n for n in names if n.startswith("train@")] == [f"train@{s}" for s in params.studies]
    # --force: on a fresh checkout DVC 3.67 cannot dry-run past a not-yet-produced output otherwise
    dry = dvc(["repro", "--dry", "--force"], work)
    assert dry.returncode == 0, dry.stderr[-2000:]
    order = [line.split("'")[1] for line in dry.stdout.splitlines() if line.startswith("Running stage")]
    assert set(order) == set(names)
    for a, b in [
        ("fetch@voc", "prepare@voc"),
        ("prepare@voc", "splits@voc"),
        ("splits@voc", "train@table1"),
        ("splits@cityscapes", "train@table3"),
        ("train@fig4", "report"),
        ("splits@voc", "sweep@r_tau"),
    ]:
        assert order.index(a) < order.index(b), (a, b, order)
    assert not (work / "data").exists()  # a dry run touches nothing
