"""Ray Tune studies for real: a local cluster, concurrent trials, kill + resume, MLflow runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.config import Params, build, load_params
from pipeline.orchestrate import ResourceError, run_cells, search_limit, study_specs, trial_resources
from pipeline.sweep import _search, sweep_specs
from tests.conftest import REPO
from tests.test_e2e_dvc import tiny_params


def test_gpu_request_on_cpu_cluster_fails_fast():
    with pytest.raises(ResourceError, match="gpus_per_trial = 1.0 but the Ray cluster has 0 GPU"):
        trial_resources({"CPU": 2.0}, cpus=1, gpus=1.0)
    assert trial_resources({"CPU": 2.0}, cpus=0.5, gpus=None) == {"cpu": 0.5, "gpu": 0.0}
    assert trial_resources({"CPU": 8.0, "GPU": 4.0}, cpus=2, gpus=None) == {"cpu": 2, "gpu": 1.0}
    with pytest.raises(ResourceError, match="cpus_per_trial"):
        trial_resources({"CPU": 2.0}, cpus=4, gpus=0)


def test_study_cells_are_split_backbone_variant_seed():
    params = load_params(REPO / "params.yaml")
    specs = study_specs(params, "demo", REPO)
    assert len(specs) == 4  # supervised at 3 fractions, DSSN at 1/16 (variant_splits)
    assert {s.cell for s in specs} >= {"1_16-resnet18-dssn-s0", "1_4-resnet18-supervised-s0"}
    assert all(Path(s.root).is_absolute() and Path(s.split_dir).is_absolute() for s in specs)
    sup = next(s for s in specs if s.variant == "supervised")
    assert not sup.method.use_unlabeled and sup.train.crop == 64


def _prepare(root: Path, params: dict) -> Path:
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    old = os.environ.get("DVC_ROOT")
    os.environ["DVC_ROOT"] = str(root)
    try:
        for stage in ("fetch", "prepare", "splits"):
            assert main([stage, "synthetic"]) == 0
    finally:
        if old is None:
            os.environ.pop("DVC_ROOT")
        else:
            os.environ["DVC_ROOT"] = old
    return root


def _env(root: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    e.update(DVC_ROOT=str(root), PYTHONPATH=str(REPO), MLFLOW_DISABLE_TELEMETRY="true")
    return e


def _train(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "demo"],
        cwd=root,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=600,
    )


def start_train(root: Path) -> subprocess.Popen:
    """The train stage in the background, in a session of its own (kill -9 takes its Ray workers too)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "train", "demo"],
        cwd=root,
        env=_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _trial_runs(root: Path, study: str = "demo"):
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name(f"dssn/{study}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("role") == "trial"]


@pytest.mark.slow
def test_four_trials_run_concurrently(tmp_path):
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    root = _prepare(tmp_path, params)
    out = _train(root)
    assert out.returncode == 0, out.stderr[-3000:]
    _, trials = _trial_runs(root)
    assert len(trials) == 4
    starts = [r.info.start_time for r in trials]
    ends = [r.info.end_time for r in trials]
    assert max(starts) < min(ends), "the 4 trials did not overlap in time"
    cells = {p.parent.name for p in root.glob("ray_results/*/cells/*/last.pt")}
    assert len(cells) == 4 and cells == {p.parent.name for p in root.glob("ray_results/*/cells/*/best.pt")}
    # each trial's latest Tune checkpoint is its result (num_to_keep=1): no resume state is left
    assert not list(root.glob("ray_results/**/state.pt")), "a finished cell kept its resume state"
    assert len(list(root.glob("ray_results/*/attempts/*/*/checkpoint_*/dssn_result.json"))) == 4


@pytest.mark.slow
def test_killed_study_resumes_without_repeating_or_duplicating(tmp_path):
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    demo = params["studies"]["demo"]
    demo["overrides"]["train"].update(epochs=6, iters_per_epoch=3)
    params["ray"].update(cpus_per_trial=1.0)  # 2 at a time: supervised cells finish first
    root = _prepare(tmp_path, params)
    runs_dir = root / "results/runs/demo"
    proc = start_train(root)
    deadline = time.time() + 400
    while time.time() < deadline and len(list(runs_dir.glob("*.json"))) < 1:
        time.sleep(0.5)
    finished = {p.name: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")}
    assert finished, "no trial finished before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(finished) < 4, "the study finished before it could be killed"

    again = _train(root)
    assert again.returncode == 0, again.stderr[-3000:]
    now = {p.name: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")}
    assert len(now) == 4
    for name, mtime in finished.items():
        assert now[name] == mtime, f"{name} was trained again"
    client, trials = _trial_runs(root)
    assert len(trials) == 4, "a resumed trial opened a second MLflow run"
    assert {r.data.tags["dssn.cell"] for r in trials} == {
        json.loads(p.read_text())["cell"] for p in runs_dir.glob("*.json")
    }
    for r in trials:
        assert r.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/miou_student")]
        assert sorted(set(steps)) == list(range(1, 7))


@pytest.mark.slow
def test_adding_a_seed_keeps_finished_cells_and_a_changed_cell_retrains(tmp_path):
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    demo = params["studies"]["demo"]
    demo.update(splits=["1_4"], variants=["supervised"], seeds=[0])
    root = _prepare(tmp_path, params)
    runs_dir = root / "results/runs/demo"
    assert _train(root).returncode == 0
    first = {p.name: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")}
    assert list(first) == ["1_4-resnet18-supervised-s0.json"]

    demo["seeds"] = [0, 1]  # a new seed: a new experiment, but cell s0 is unchanged
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _train(root)
    assert out.returncode == 0, out.stderr[-3000:]
    now = {p.name: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")}
    assert sorted(now) == ["1_4-resnet18-supervised-s0.json", "1_4-resnet18-supervised-s1.json"]
    assert now["1_4-resnet18-supervised-s0.json"] == first["1_4-resnet18-supervised-s0.json"]
    _, trials = _trial_runs(root)
    assert len(trials) == 2  # one MLflow run per cell, none repeated

    demo["overrides"]["train"]["lr"] = 0.0005  # every cell's definition changes: all retrain
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _train(root).returncode == 0
    again = {p.name: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")}
    assert sorted(again) == sorted(now) and all(again[k] != now[k] for k in now)
    _, trials = _trial_runs(root)
    assert len(trials) == 4


def test_fingerprint_follows_split_lists(tmp_path):
    import dataclasses

    from pipeline.orchestrate import fingerprint

    params = load_params(REPO / "params.yaml")
    spec = study_specs(params, "demo", REPO)[0]
    split_dir = tmp_path / "splits"
    (split_dir / spec.split).mkdir(parents=True)
    for f, text in (("labeled.txt", "a a\n"), ("unlabeled.txt", "b b\n")):
        (split_dir / spec.split / f).write_text(text)
    (split_dir / "val.txt").write_text("c c\n")
    spec = dataclasses.replace(spec, split_dir=str(split_dir))
    before = fingerprint([spec])
    assert fingerprint([spec]) == before
    (split_dir / spec.split / "labeled.txt").write_text("a a\nd d\n")
    assert fingerprint([spec]) != before  # a rebuilt split never reuses old results


@pytest.mark.slow
def test_ddp_trial_with_two_workers(tmp_path):
    """ray.workers_per_trial = 2: a Ray Train TorchTrainer (gloo on CPU) inside the Tune trial."""
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["ray"].update(workers_per_trial=2, cpus_per_trial=1.0)
    demo = params["studies"]["demo"]
    demo.update(splits=["1_4"], variants=["dssn"])
    demo["overrides"]["train"].update(batch_l=4, batch_u=4)  # 2 + 2 per worker (BN needs > 1 sample)
    # the stateful pseudo-label switches all-reduce inside the step: exercise them across real workers
    demo["overrides"].setdefault("method", {}).update(selection="adaptive", pl_align=True)
    root = _prepare(tmp_path, params)
    out = _train(root)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    client, trials = _trial_runs(root)
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    assert trials[0].data.tags["ray.workers"] == "2"
    steps = [m.step for m in client.get_metric_history(trials[0].info.run_id, "val/miou_student")]
    assert steps == [1, 2]
    for key in ("pl_threshold/background", "pl_align/background"):
        assert len(client.get_metric_history(trials[0].info.run_id, key)) == 2, key
    assert (root / "results/runs/demo/1_4-resnet18-dssn-s0.json").exists()


def test_concurrency_limits_compose_into_one_limiter():
    """Tune raises when `max_concurrent_trials` meets a ConcurrencyLimiter with another limit, so
    the sweep's limit and the cluster's (ray.max_concurrent, DDP fit) become one limiter."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    assert search_limit(None, 4, None) == (None, 4)  # random search: Tune's own limit
    assert search_limit(None, None, None) == (None, None)
    raw = OptunaSearch(seed=0)
    assert search_limit(raw, None, None) == (raw, None)
    alg, limit = search_limit(raw, 4, 2)
    assert isinstance(alg, ConcurrencyLimiter) and alg.max_concurrent == 2 and limit is None
    alg, limit = search_limit(raw, 3, None)
    assert alg.max_concurrent == 3 and limit is None


def _sweep_params(**sweep) -> dict:
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["sweeps"] = {
        "x": {"study": "demo", "split": "1_4", "r": [0.5, 0.99], "tau_low": [0.3, 0.95], **sweep}
    }
    return params


def test_explore_search_is_asha_over_the_configured_rungs(tmp_path):
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    params = load_params_from(tmp_path, _sweep_params(mode="explore", grace_period=2, reduction_factor=3))
    search = _search(params.sweeps["x"], epochs=9)
    sched = search["scheduler"]
    assert isinstance(sched, ASHAScheduler) and isinstance(search["search_alg"], OptunaSearch)
    # max_t one past the budget: survivors finish (and log) on their own; rungs at 2 and 6 epochs
    assert sched._max_t == 10 and [m for m, _ in sched._brackets[0]._rungs] == [6, 2]
    assert search["max_concurrent"] == 4 and search["metric"] == "val/miou_student"


def load_params_from(root: Path, raw: dict):
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(root / "params.yaml")


@pytest.mark.slow
def test_trials_stopped_by_the_scheduler_end_killed_and_one_at_a_time(tmp_path):
    """A real ASHA whose max_t is below the budget stops every trial after epoch 1, whatever the
    metrics (ASHA's rung decisions on a tiny model are ties and arrival-order races)."""
    import ray
    from ray.tune.schedulers import ASHAScheduler

    raw = _sweep_params(mode="explore", num_samples=2)  # the sweep's own limit: the default 4
    raw["ray"]["max_concurrent"] = 1  # the cluster's, tighter: used to make Tune raise
    root = _prepare(tmp_path, raw)
    params = load_params(root / "params.yaml")
    specs = sweep_specs(params, "x", root)[:1]
    assert specs[0].train.epochs == 2
    search = _search(params.sweeps["x"], specs[0].train.epochs)
    search["scheduler"] = ASHAScheduler(time_attr="training_iteration", max_t=1, grace_period=1)
    try:
        res = run_cells(params, root, "sweep-x", specs, root / "results/sweeps/x/runs", search=search)
    finally:
        ray.shutdown()
    results = list(res["results"])
    assert len(results) == 2 and res["results"].num_errors == 0
    assert all(r.metrics["training_iteration"] == 1 for r in results)
    client, trials = _trial_runs(root, "sweep-x")
    assert len(trials) == 2 and {t.info.status for t in trials} == {"KILLED"}
    for t in trials:
        assert [m.step for m in client.get_metric_history(t.info.run_id, "val/miou_student")] == [1]
    first, second = sorted(trials, key=lambda t: t.info.start_time)
    first_done = next(r for r in results if r.config["r"] == float(first.data.params["method.r"]))
    assert first_done.metrics["timestamp"] * 1000 <= second.info.start_time + 1000  # one at a time


def test_a_trial_killed_between_its_result_and_closing_its_run_is_closed_on_resume(tmp_path):
    """A trial whose last checkpoint is its result (it finished, but its driver died before the
    result file was written) reports that result again at once, without training, and its MLflow
    run, left RUNNING by the kill, ends FINISHED (the driver would otherwise close it as KILLED)."""
    from ray.tune import Checkpoint

    from pipeline.orchestrate import RESULT_FILE, ResultWriter, _run_cell

    spec = study_specs(load_params(REPO / "params.yaml"), "demo", REPO)[0]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("dssn/demo", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp_id).info.run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    done = {"cell": spec.cell, "cell_key": "k", "mlflow_run_id": run_id, "final/epochs": 4}
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / RESULT_FILE).write_text(json.dumps(done))
    tracking = {"uri": uri, "experiment": "demo-x", "cell_keys": {spec.cell: "k"}, "storage": str(tmp_path)}
    reports = []

    def report(metrics, checkpoint=None):  # Tune's: persists the checkpoint before returning
        reports.append((metrics, checkpoint.to_directory(str(tmp_path / f"persisted{len(reports)}"))))

    _run_cell(spec, "t1", tracking, report, lambda: Checkpoint(str(tmp_path / "ckpt")))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(reports) == 1 and json.loads((Path(reports[0][1]) / RESULT_FILE).read_text()) == done
    writer = ResultWriter(tmp_path / "runs", None)  # what the driver does with it
    writer.on_checkpoint(1, [], None, Checkpoint(reports[0][1]))
    assert json.loads((tmp_path / "runs" / f"{spec.cell}.json").read_text()) == done


def test_paper_cityscapes_ohem_is_the_reference_per_gpu_batch():
    """R101: 8 GPUs x 1 image, min_kept 100k per call; R50: 4 x 2, 200k (dssn-method.md §6.1)."""
    params = load_params(REPO / "configs" / "paper.yaml")
    seen = set()
    for study in ("table3", "fig3", "table2"):
        for s in study_specs(params, study, REPO):
            t = s.train
            seen.add((study, s.model.backbone, t.sup_loss, t.ohem_chunk, t.ohem_min_kept, t.batch_l))
    assert {x for x in seen if x[0] == "table3"} == {
        ("table3", "resnet101", "ohem", 1, 100_000, 8),
        ("table3", "resnet50", "ohem", 2, 200_000, 8),
    }
    assert {x for x in seen if x[0] == "fig3"} == {("fig3", "resnet50", "ohem", 2, 200_000, 8)}
    assert {x[2:4] for x in seen if x[0] == "table2"} == {("ce", None)}  # VOC untouched


def test_backbone_overrides_reach_cells_and_sweeps():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["studies"]["demo"]["backbones"] = ["resnet18", "resnet34"]
    raw["studies"]["demo"]["backbone_overrides"] = {
        "resnet34": {"train": {"lr": 0.01}, "method": {"r": 0.9, "w_con": 0.5}}
    }
    raw["sweeps"] = {"s": {"study": "demo", "split": "1_16", "r": [0.8], "tau_low": [0.9]}}
    params = build(Params, raw, "")
    cells = {(s.model.backbone, s.variant): s for s in study_specs(params, "demo", REPO)}
    assert cells[("resnet34", "dssn")].train.lr == 0.01 and cells[("resnet34", "dssn")].method.r == 0.9
    assert cells[("resnet18", "dssn")].train.lr == 0.001 and cells[("resnet18", "dssn")].method.r == 0.96
    assert cells[("resnet34", "supervised")].train.epochs == 4  # on top of the study's overrides
    raw["studies"]["demo"]["backbones"] = ["resnet34"]  # a sweep runs on the study's first backbone
    sw = sweep_specs(build(Params, raw, ""), "s", REPO)
    assert {(s.train.lr, s.method.w_con, s.method.r) for s in sw} == {(0.01, 0.5, 0.8)}


def test_a_new_attempt_resumes_from_the_newest_complete_checkpoint(tmp_path):
    """A killed driver can leave the newest checkpoint half uploaded; the next attempt finds every
    checkpoint of the cell (later attempts first) and resumes from the newest one that opens."""
    import torch

    from pipeline.orchestrate import last_checkpoints, resume_point
    from pipeline.storage import Store

    exp = Store.at(tmp_path / "demo-abc")
    good = tmp_path / "demo-abc/attempts/1/1_8-resnet18-dssn-s0_0a1b2_00000/checkpoint_000001"
    cut = tmp_path / "demo-abc/attempts/2/1_8-resnet18-dssn-s0_9f8e7_00000/checkpoint_000000"
    older = good.with_name("checkpoint_000000")
    other = tmp_path / "demo-abc/attempts/2/1_8-resnet18-supervised-s0_9f8e7_00001/checkpoint_000000"
    for d in (good, cut, older, other):
        d.mkdir(parents=True)
    torch.save({"epoch": 2}, good / "state.pt")
    torch.save({"epoch": 1}, older / "state.pt")
    (cut / "state.pt").write_bytes(b"PK\x03\x04 cut short")
    found = last_checkpoints(exp, ["1_8-resnet18-dssn-s0"])
    assert found == {"1_8-resnet18-dssn-s0": [str(cut), str(good), str(older)]}
    ckpt, resume, finished = resume_point(None, found["1_8-resnet18-dssn-s0"], exp.fs, "c")
    assert ckpt.path == str(good) and resume == {"epoch": 2} and finished is None
    assert resume_point(None, [], exp.fs, "c") == (None, None, None)


def test_checkpoint_staging_left_by_a_kill_is_removed_a_day_later(tmp_path, monkeypatch):
    """A trial killed while Tune uploads its checkpoint leaves the staging folder (3x the weights);
    the next report on that machine removes ours older than a day, and nothing younger."""
    import tempfile

    from pipeline.orchestrate import STAGING_MAX_AGE_S, _report_with

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale, fresh, other = tmp_path / "dssn-ckpt-stale", tmp_path / "dssn-ckpt-fresh", tmp_path / "keep-me"
    for d in (stale, fresh, other):
        d.mkdir()
        (d / "state.pt").write_bytes(b"x")
    old = time.time() - STAGING_MAX_AGE_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    seen = []
    _report_with(
        lambda m, checkpoint: seen.append(sorted(os.listdir(checkpoint.path))), {"epoch": 1}, {"a.json": {}}
    )
    assert seen == [["a.json"]]
    assert not stale.exists() and fresh.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dssn-ckpt-fresh", "keep-me"]  # its own is gone too
