"""kill -9 at four points (during extraction, mid-epoch, between cells, during the report), each
followed by the same command, which must finish with what an uninterrupted run gives: equal
results, one MLflow run per cell, one copy of each series (issue 12)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_orchestrate import _env, _prepare, _train
from tests.test_reliability import (  # noqa: F401 - ray_tmpdir is an autouse fixture here too
    assert_one_run_per_cell_one_copy,
    kill_when,
    one_cell_params,
    ray_tmpdir,
)

CELLS = {"1_4-resnet18-supervised-s0", "1_4-resnet18-supervised-s1"}
EPOCHS = 4


def _stage(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / "stages" / args[0]), *args[1:]],
        cwd=root,
        env=_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(root: Path, *args: str) -> None:
    p = _stage(root, *args)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]


def _results(root: Path) -> dict[str, dict]:
    """Each cell's final metrics (ids, paths and timings left out)."""
    out = {}
    for f in sorted((root / "results/runs/demo").glob("*.json")):
        d = json.loads(f.read_text())
        out[f.stem] = {
            k: v
            for k, v in d.items()
            if (k.startswith("final/") and "seconds" not in k) or k in ("split", "seed", "variant")
        }
    return out


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.slow
def test_kill_mid_epoch_between_cells_and_during_the_report(tmp_path):
    params = one_cell_params(epochs=EPOCHS, iters=3)
    params["studies"]["demo"]["seeds"] = [0, 1]
    params["ray"]["max_concurrent"] = 1  # one cell after the other: there is a "between cells"

    (tmp_path / "ref").mkdir()
    ref = _prepare(tmp_path / "ref", params)
    assert _train(ref).returncode == 0
    _finish(ref, "report.py")

    root = tmp_path / "killed"
    root.mkdir()
    _prepare(root, params)
    runs = root / "results/runs/demo"
    cells = root / "ray_results"
    # 1. mid-epoch: a cell has its first epoch checkpoint and no cell is finished yet
    kill_when(
        _stage(root, "train.py", "demo"),
        lambda: any(cells.glob("*/attempts/*/*/checkpoint_*/state.pt")) and not any(runs.glob("*.json")),
    )
    # 2. between cells: the first cell's result is written, the second is not
    kill_when(_stage(root, "train.py", "demo"), lambda: len(list(runs.glob("*.json"))) == 1)
    _finish(root, "train.py", "demo")
    assert _results(root) == _results(ref)
    assert set(_results(root)) == CELLS
    assert_one_run_per_cell_one_copy(root, CELLS, EPOCHS)

    # 3. during the report: once it has started writing tables
    tables = root / "results/tables"
    kill_when(_stage(root, "report.py"), lambda: tables.is_dir() and any(tables.iterdir()), timeout=120)
    _finish(root, "report.py")
    assert (tables / "demo.csv").read_text() == (ref / "results/tables/demo.csv").read_text()
    assert json.loads((root / "results/metrics.json").read_text()) == json.loads(
        (ref / "results/metrics.json").read_text()
    )


def _voc_fetch_params(root: Path, archive: Path) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["datasets"]["voc"] = {
        "kind": "voc",
        "num_classes": 21,
        "protocols": {"blended": {"names": ["1_8"]}},
        "source": {
            "archive": str(archive),
            "md5": hashlib.md5(archive.read_bytes()).hexdigest(),
            "use_sbd": False,
            "verify_counts": False,
        },
    }
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.mark.slow
def test_kill_during_extraction_then_fetch_again(tmp_path):
    from tests.data.builders import tar_of, voc_sbd_release

    ids = [f"2007_{i:06d}" for i in range(3000)]
    voc_sbd_release(tmp_path / "src", ids[:2500], ids[2500:], [], [])
    archive = tar_of(tmp_path / "src" / "VOCdevkit", tmp_path / "voc.tar", "VOCdevkit")
    ref, root = tmp_path / "ref", tmp_path / "killed"
    for r in (ref, root):
        r.mkdir()
        _voc_fetch_params(r, archive)
    _finish(ref, "fetch.py", "voc")

    raw = root / "data/raw"
    kill_when(
        _stage(root, "fetch.py", "voc"), lambda: any(raw.glob("voc/.tmp-extract-*/VOCdevkit")), timeout=120
    )
    _finish(root, "fetch.py", "voc")
    assert _tree(root / "data") == _tree(ref / "data")
    assert not list(raw.rglob(".tmp-extract-*"))
