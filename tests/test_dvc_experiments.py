"""DVC experiments, MLflow and the committed lock as their users know them: `dvc exp run -S`,
`dvc exp show`, `dvc metrics diff` and `dvc plots diff` compare two runs; the report needs no
tracking server; MLflow shows named runs, standard tags and a study summary; a fresh clone's
`dvc status` lists no modified dependency."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.test_e2e_dvc import copy_repo, dvc, env, tiny_params


def _git(args: list[str], cwd) -> None:
    e = {
        **env(cwd),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", *args], cwd=cwd, env=e, check=True, capture_output=True, text=True)


def _modified(status: dict) -> list[str]:
    """Every dependency or output `dvc status --json` reports as modified (not merely missing)."""
    out = []
    for stage, entries in status.items():
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            for kind, paths in entry.items():
                if isinstance(paths, dict):
                    out += [f"{stage}: {kind} {p}" for p, st in paths.items() if st == "modified"]
    return out


def test_committed_lock_matches_the_committed_code(tmp_path):
    """What a new user sees right after cloning: `dvc status` may list outputs a fresh clone does
    not have yet, never a dependency (code, params) that changed since dvc.lock was written."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, capture_output=True)
    out = dvc(["status", "--json"], clone)
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads(out.stdout or "{}")
    modified = _modified(status)
    assert not modified, (
        "dvc.lock does not match the committed code/params (re-run `dvc repro` and commit dvc.lock): "
        + "; ".join(modified)
    )
    # ... and `dvc repro` there trains the demo (its per-clone output is missing), not only the
    # report from the committed results: `make demo` on a fresh clone fills its own MLflow store
    train = [e for e in status.get("train@demo", []) if isinstance(e, dict) and "changed outs" in e]
    assert train and train[0]["changed outs"] == {"data/trained/demo.json": "deleted"}, status


def test_committed_demo_results_show_dssn_at_work():
    """Issue 14's acceptance on the demo's committed results, which `dvc repro` of the committed
    code wrote (the test above: dvc.lock matches the code). The tiny configuration of the
    end-to-end tests cannot show learning: 4 steps (even 60) leave its teacher below CPLG's gate."""
    runs = [json.loads(p.read_text()) for p in sorted((REPO / "results/runs/demo").glob("*.json"))]
    assert runs, "no committed demo results: run `make demo` and commit results/"
    cells = {(r["split"], r["variant"]): r for r in runs}
    floor = {round(r["final/miou_background_only"], 6) for r in runs}
    assert len(floor) == 1, "one val set, one background-only level"
    level = floor.pop()
    for key, r in cells.items():
        assert r["final/miou_best"] >= level + 10, (key, r["final/miou_best"], level)
    sup = {split: r["final/miou_best"] for (split, variant), r in cells.items() if variant == "supervised"}
    assert sup["1_4"] >= sup["1_16"] + 10, sup
    dssn = [r for (_, variant), r in cells.items() if variant == "dssn"]
    assert dssn and ("1_16", "supervised") in cells  # the semi-supervised comparison at 1/16
    for r in dssn:
        assert all(h["train/loss_s"] > 0 for h in r["history"][1:]), r["history"]
        kept = {
            k.split("/")[1]
            for k, v in r["metrics"].items()
            if k.startswith("pseudo_kept_teacher/") and k != "pseudo_kept_teacher/background" and v > 0
        }
        assert len(kept) >= 3, kept


@pytest.mark.slow
def test_experiments_metrics_plots_and_mlflow(tmp_path):
    work = copy_repo(tmp_path / "repo")
    params = tiny_params(yaml.safe_load((work / "params.yaml").read_text()))
    params["datasets"]["synthetic"]["protocols"]["blended"]["names"] = ["1_4"]
    params["studies"]["demo"]["splits"] = ["1_4"]
    params["sweeps"] = {}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (work / "dvc.lock").unlink(missing_ok=True)
    _git(["add", "-A"], work)
    _git(["commit", "-qm", "tiny"], work)

    out = dvc(["repro"], work)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for f in ("results/metrics.json", "results/report_data/miou_vs_labels/demo-resnet18-dssn.csv"):
        assert (work / f).exists(), f
    assert oct((work / "results/metrics.json").stat().st_mode & 0o777) == "0o644"
    tracked = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"], cwd=work, capture_output=True, text=True
    ).stdout
    assert "results/metrics.json" in tracked and "results/runs/demo/" in tracked  # git sees them
    assert "results/tables" not in tracked  # the rendered tables stay ignored
    _git(["add", "-A"], work)
    _git(["commit", "-qm", "baseline results"], work)

    # MLflow: the runs table opens, runs are named by their cell, the parent summarises the study.
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dssn/demo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("role") == "parent")
    trials = [r for r in runs if r.data.tags.get("role") == "trial"]
    assert sorted(r.info.run_name for r in trials) == ["1_4-resnet18-dssn-s0", "1_4-resnet18-supervised-s0"]
    for r in [parent, *trials]:
        assert r.data.tags["mlflow.user"] and r.data.tags["mlflow.source.git.commit"]
        assert r.data.tags["mlflow.source.name"].startswith("dvc.yaml:")
    for r in trials:
        p = r.data.params
        assert "None" not in p.values() and not any(str(work) in v for v in p.values())
        assert (p["train.amp"], p["train.compile"]) == ("False", "False")  # as applied on a CPU
    assert "method.r" in parent.data.params and "seed" in parent.data.params
    assert set(parent.data.metrics) >= {"miou_best/1_4-resnet18-dssn/mean", "miou_best/1_4-resnet18-dssn/std"}

    # The report needs no tracking server: with the store gone, it rebuilds from the result files.
    os.rename(work / "mlflow.db", work / "mlflow.db.away")
    (work / "results/tables/demo.md").unlink()
    rep = dvc(["repro", "--force", "report"], work)
    assert rep.returncode == 0, rep.stdout[-2000:] + rep.stderr[-2000:]
    assert "supervised" in (work / "results/tables/demo.md").read_text()
    os.rename(work / "mlflow.db.away", work / "mlflow.db")

    # An experiment: another seed. Both revisions have numbers in exp show and metrics diff.
    ex = dvc(["exp", "run", "-n", "seed1", "-S", "studies.demo.seeds=[1]"], work)
    assert ex.returncode == 0, ex.stdout[-3000:] + ex.stderr[-3000:]
    show = dvc(["exp", "show", "--only-changed", "--json"], work)
    assert show.returncode == 0, show.stderr[-2000:]
    rows = json.loads(show.stdout)
    values = [
        (r.get("data") or {}).get("metrics", {}).get("results/metrics.json", {}).get("data") for r in rows
    ]
    values += [
        (rv.get("data") or {}).get("metrics", {}).get("results/metrics.json", {}).get("data")
        for r in rows
        for e in r.get("experiments") or []
        for rv in e["revs"]
    ]
    assert len([v for v in values if v and "demo/1_4/dssn/miou_best" in v]) == 3, show.stdout[:3000]
    diff = dvc(["metrics", "diff", "HEAD", "seed1", "--json"], work)
    assert diff.returncode == 0, diff.stderr[-2000:]
    change = json.loads(diff.stdout)["results/metrics.json"]["demo/1_4/dssn/miou_best"]
    assert change["old"] is not None and change["new"] is not None
    plots = dvc(["plots", "diff", "HEAD", "seed1", "--json", "-o", str(tmp_path / "plots")], work)
    assert plots.returncode == 0, plots.stderr[-2000:]
    out = json.loads(plots.stdout)
    assert not out.get("errors"), out["errors"]
    for f in (
        "results/report_data/miou_vs_labels/demo-resnet18-dssn.csv",
        "results/report_data/curves/demo-1_4-resnet18-dssn.csv",
        "results/report_data/per_class/demo-1_4-resnet18-dssn.csv",
    ):
        (plot,) = out["data"][f]
        assert plot["revisions"] == ["HEAD", "seed1"], f  # both experiments, one plot: the same axes
        assert {v["rev"] for v in plot["content"]["data"]["values"]} == {"HEAD", "seed1"}, f
