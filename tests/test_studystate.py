"""Which committed result files count as done: only those whose MLflow run is in this store."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from pipeline.studystate import drop_untracked, reconcile


def test_a_result_without_its_mlflow_run_is_trained_again(tmp_path):
    """A fresh clone has the committed result files but an empty tracking store: those cells are
    trained (and logged) again; a cell whose run is in the store stays done."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("dssn/demo", artifact_location=(tmp_path / "art").as_uri())
    other = client.create_experiment("dssn/other", artifact_location=(tmp_path / "art2").as_uri())
    here = client.create_run(exp).info.run_id
    elsewhere = client.create_run(other).info.run_id  # a run, but of another study
    runs = tmp_path / "runs"
    runs.mkdir()
    ids = {"a": here, "b": "0123456789abcdef", "c": elsewhere, "d": None}
    for cell, run_id in ids.items():
        (runs / f"{cell}.json").write_text(
            json.dumps({"cell": cell, "cell_key": "k", "mlflow_run_id": run_id})
        )
    state = reconcile(runs, ["a", "b", "c", "d", "e"], dict.fromkeys("abcde", "k"), "demo-x", False)
    assert sorted(state.done) == ["a", "b", "c", "d"] and state.todo == ["e"]

    assert drop_untracked(uri, "dssn/demo", state) == ["b", "c", "d"]
    assert sorted(state.done) == ["a"] and state.todo == ["b", "c", "d", "e"]
    assert drop_untracked(f"sqlite:///{tmp_path / 'empty.db'}", "dssn/demo", state) == ["a"]
    assert state.done == {} and state.todo == ["a", "b", "c", "d", "e"]
