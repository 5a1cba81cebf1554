"""The one place where a study's state is reconciled: result files, Ray attempts, MLflow runs.

The truth is the result file of each cell (`results/runs/<study>/<cell>.json`, written last by a
finished trial) checked against the cell's current definition key. Ray's experiment state is never
trusted to say what is done: each driver run starts a fresh Tune attempt over the cells still to
do, and an unfinished cell resumes from its own checkpoint. Nothing is deleted before the new
state is complete and verified, so an interruption at any point leaves a study that the same
command finishes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.storage import Store

ATTEMPTS = "attempts"  # <ray experiment>/attempts/<n>: one Tune run per driver run


@dataclass
class StudyState:
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # cell -> its current summary
    todo: list[str] = field(default_factory=list)  # cells to train (or resume)
    stale: list[Path] = field(default_factory=list)  # result files of other definitions


def current_result(path: Path, cell_key: str | None, experiment: str) -> dict[str, Any] | None:
    """The summary in `path` when it belongs to the cell's current definition, else None.

    A cell with a key is current while its key holds (a finished cell survives an added seed);
    a sweep trial (no key) only within its own experiment.
    """
    try:
        done = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict):
        return None
    if cell_key is not None and "cell_key" in done:
        return done if done["cell_key"] == cell_key else None
    return done if done.get("ray_experiment") == experiment else None


def reconcile(
    runs_dir: Path, cells: list[str], cell_keys: dict[str, str], experiment: str, search: bool
) -> StudyState:
    """What is done, what is left and what is stale; reads only (see `commit`)."""
    state = StudyState()
    wanted = set(cells)
    for f in sorted(Path(runs_dir).glob("*.json")) if Path(runs_dir).is_dir() else []:
        cell = f.stem
        key = None if search else cell_keys.get(cell)
        done = current_result(f, key, experiment)
        if done is not None and (search or cell in wanted):
            state.done[cell] = done
        else:
            state.stale.append(f)
    state.todo = [c for c in cells if c not in state.done]
    return state


def next_attempt(exp_dir: Store) -> str:
    """A fresh Tune run name under the experiment folder (never restored)."""
    n = 1 + max((int(p.name) for p in (exp_dir / ATTEMPTS).children() if p.name.isdigit()), default=0)
    return str(n)


def commit(runs_dir: Path, keep: set[str], exp_dir: Store, attempt: str | None) -> list[Path]:
    """After a verified complete study: drop result files of other definitions and older attempts
    (their checkpoints; the cells' weights live in `<experiment>/cells`)."""
    removed = []
    for f in Path(runs_dir).glob("*.json"):
        if f.stem not in keep:
            f.unlink(missing_ok=True)
            removed.append(f)
    for p in (exp_dir / ATTEMPTS).children():
        if p.name != attempt and p.is_dir():
            p.rmtree()
    return removed


def settle_runs(uri: str, experiment_name: str, state: StudyState) -> None:
    """Close what a killed driver left RUNNING before new work starts: the run of a cell whose
    result file was written ends FINISHED, every other run of the study KILLED.

    One driver runs a study at a time (DVC locks the repo), so a RUNNING run is an orphan; a trial
    that resumes reopens its own run.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return
    finished = {d.get("mlflow_run_id") for d in state.done.values()}
    runs = client.search_runs(
        [exp.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=10_000
    )
    for run in runs:
        client.set_terminated(run.info.run_id, "FINISHED" if run.info.run_id in finished else "KILLED")
