"""Issue 12: a study that any interruption leaves finishable, and one MLflow run per cell with one
copy of each series (real Ray local cluster, real MLflow sqlite, `python -m pipeline.cli`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.test_e2e_dvc import tiny_params
from tests.test_orchestrate import _prepare, _train, _trial_runs, start_train

CELL = "1_4-resnet18-supervised-s0"


@pytest.fixture(autouse=True)
def ray_tmpdir(monkeypatch):
    """Ray's session folders go to a short temp folder removed afterwards, not /tmp/ray (a short
    path: Ray's socket paths must stay under 107 characters)."""
    import shutil
    import tempfile

    d = tempfile.mkdtemp(prefix="rt")
    monkeypatch.setenv("RAY_TMPDIR", d)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def one_cell_params(epochs: int = 2, iters: int = 2) -> dict:
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    demo = params["studies"]["demo"]
    demo.update(splits=["1_4"], variants=["supervised"], seeds=[0])
    demo["overrides"]["train"].update(epochs=epochs, iters_per_epoch=iters)
    return params


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300) -> None:
    """kill -9 the whole driver (Ray workers included) once `ready()` holds."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the kill point"
    assert ready(), "the kill point was never reached"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def all_runs(root: Path, study: str = "demo") -> list:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"dssn/{study}")
    return client.search_runs([exp.experiment_id], max_results=1000)


def assert_one_run_per_cell_one_copy(root: Path, cells: set[str], epochs: int) -> None:
    client, trials = _trial_runs(root)
    by_cell = {}
    for r in trials:
        by_cell.setdefault(r.data.tags["dssn.cell"], []).append(r)
    current = {
        json.loads(p.read_text())["mlflow_run_id"] for p in (root / "results/runs/demo").glob("*.json")
    }
    for cell in cells:
        runs = [r for r in by_cell[cell] if r.info.run_id in current]
        assert len(runs) == 1, f"{cell}: {len(runs)} runs behind the results"
        r = runs[0]
        assert r.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/miou_student")]
        assert sorted(steps) == list(range(1, epochs + 1)), f"{cell}: steps {steps}"
        assert len(client.get_metric_history(r.info.run_id, "final/miou_best")) == 1
    assert not [r for r in all_runs(root) if r.info.status == "RUNNING"], "a run was left RUNNING"


@pytest.mark.slow
def test_changed_config_killed_then_reverted_finishes(tmp_path):
    """Defect 1: change train.lr, kill mid-training, restore the old params: the re-run finishes
    with the first results intact (it used to fail for ever with 'N of N trials did not finish')."""
    params = one_cell_params()
    root = _prepare(tmp_path, params)
    first = _train(root)
    assert first.returncode == 0, first.stderr[-3000:]
    result = root / "results/runs/demo" / f"{CELL}.json"
    done = result.read_bytes()

    changed = json.loads(json.dumps(params))
    changed["studies"]["demo"]["overrides"]["train"].update(lr=0.0005, epochs=20, iters_per_epoch=3)
    write_params(root, changed)
    kill_when(start_train(root), lambda: any(root.glob("ray_results/*/attempts/*/*/checkpoint_*/state.pt")))
    assert result.read_bytes() == done, "the changed run touched the finished result before finishing"

    write_params(root, params)
    again = _train(root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert result.read_bytes() == done
    parents = [r for r in all_runs(root) if r.data.tags.get("role") == "parent"]
    assert {r.info.status for r in parents} <= {"FINISHED", "KILLED", "FAILED"}
    exp = json.loads(done)["ray_experiment"]
    assert [r.info.status for r in parents if r.data.tags["ray.experiment"] == exp] == ["FINISHED"]
    assert_one_run_per_cell_one_copy(root, {CELL}, 2)


@pytest.mark.slow
def test_cell_trained_again_after_its_folders_are_gone_has_one_run(tmp_path):
    """Defect 5: a cell whose Ray folder and result are gone trains again into one run with one
    copy of each series (it used to append a second copy to its FINISHED run)."""
    import shutil

    root = _prepare(tmp_path, one_cell_params())
    assert _train(root).returncode == 0
    shutil.rmtree(root / "ray_results")
    shutil.rmtree(root / "results")
    out = _train(root)
    assert out.returncode == 0, out.stderr[-3000:]
    client, trials = _trial_runs(root)
    assert len(trials) == 1, "a cell has two active runs"
    assert_one_run_per_cell_one_copy(root, {CELL}, 2)


def test_a_retried_trial_logs_each_point_once_and_a_fresh_start_replaces_its_run(tmp_path):
    """Defect 5: a trial resumed (Ray retry, re-run) from epoch 2 re-logs epoch 2 and final/*
    without a second copy; a trial that starts from scratch leaves one active run for its cell."""
    from pipeline.tracking import TrialRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("dssn/demo", artifact_location=(tmp_path / "art").as_uri())
    tags = {
        "dssn.study": "demo",
        "dssn.cell": "c",
        "dssn.cell_key": "k1",
        "ray.experiment": "e1",
        "ray.trial_id": "t1",
    }

    def attempt(resume_from, trial):
        run = TrialRun(uri, exp, "parent", "demo/c", {**tags, "ray.trial_id": trial}, {"a": 1}, resume_from)
        for epoch in range((resume_from or 0) + 1, 3):
            run.log_metrics({"val/miou": 10.0 * epoch}, step=epoch)
        run.log_metrics({"final/miou_best": 20.0}, step=2)
        return run

    first = attempt(None, "t1")
    first.log_metrics({"val/miou": 20.0}, step=2)  # killed after logging epoch 2, before its checkpoint
    second = attempt(1, "t2")  # resumes from the epoch-1 checkpoint
    third = attempt(2, "t3")  # a retry after the final metrics were logged
    assert first.run_id == second.run_id == third.run_id
    assert [m.step for m in client.get_metric_history(first.run_id, "val/miou")] == [1, 2]
    assert len(client.get_metric_history(first.run_id, "final/miou_best")) == 1
    assert client.get_run(first.run_id).data.tags["ray.trial_id"] == "t3"

    fresh = attempt(None, "t4")  # its checkpoint is gone: trained again from scratch
    active = client.search_runs([exp], filter_string="tags.`dssn.cell` = 'c'")
    assert [r.info.run_id for r in active] == [fresh.run_id] != [first.run_id]
    assert [m.step for m in client.get_metric_history(fresh.run_id, "val/miou")] == [1, 2]
