"""The report turns a prepared MLflow database into exactly the expected tables."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.report import ReportError, load_runs, paper_comparison, study_tables, summarize, write_report

# (split, n_labeled, variant, seed) -> final/miou_best ; teacher/student derived from it below
CELLS = {
    ("1_8", 1323, "supervised", 0): 70.0,
    ("1_8", 1323, "supervised", 1): 72.0,
    ("1_8", 1323, "supervised", 2): 71.0,
    ("1_8", 1323, "dssn", 0): 79.0,
    ("1_8", 1323, "dssn", 1): 80.0,
    ("1_8", 1323, "dssn", 2): 81.0,
    ("1_16", 662, "supervised", 0): 65.0,
    ("1_16", 662, "dssn", 0): 78.0,
}


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("dssn/t2", artifact_location=(root / "art").as_uri())
    parent = c.create_run(exp, tags={"role": "parent"}).info.run_id

    def trial(split, n, variant, seed, best, status="FINISHED", protocol="blended", cell=None):
        tags = {
            "role": "trial",
            "mlflow.parentRunId": parent,
            "dssn.study": "t2",
            "dssn.dataset": "voc",
            "dssn.protocol": protocol,
            "dssn.split": split,
            "dssn.backbone": "resnet101",
            "dssn.variant": variant,
            "dssn.seed": str(seed),
            "dssn.n_labeled": str(n),
            "dssn.n_train": "10582",
            "dssn.cell": cell or f"{split}-resnet101-{variant}-s{seed}",
            "ray.trial_id": f"t{seed}",
        }
        r = c.create_run(exp, tags=tags).info.run_id
        c.log_metric(r, "final/miou_best", best)
        c.log_metric(r, "final/miou_student_best", best - 1)
        c.log_metric(r, "final/miou_student_last", best - 2)
        if variant != "supervised":
            c.log_metric(r, "final/miou_teacher_best", best)
        c.log_metric(r, "final/iou_student_last/background", 90.0)
        c.log_metric(r, "final/iou_student_last/cat", best - 10)
        c.set_terminated(r, status)
        return r

    for (split, n, variant, seed), best in CELLS.items():
        trial(split, n, variant, seed, best)
    trial("1_8", 1323, "dssn", 2, 50.0, status="FAILED", cell="1_8-resnet101-dssn-s2")  # ignored: failed
    trial("1_16", 662, "dssn", 0, 10.0, cell="1_16-resnet101-dssn-s0")  # older duplicate of a cell...
    trial("1_16", 662, "dssn", 0, 78.0, cell="1_16-resnet101-dssn-s0")  # ...the latest wins
    return uri


def test_load_runs_filters_and_dedupes(db):
    df = load_runs(db, ["dssn/t2"])
    assert len(df) == len(CELLS)
    assert df.loc[(df.split == "1_16") & (df.variant == "dssn"), "final/miou_best"].tolist() == [78.0]
    with pytest.raises(ReportError, match="'dssn/nope' not found"):
        load_runs(db, ["dssn/nope"])


def test_tables_hold_hand_computed_mean_std_in_fraction_order(db):
    tables = study_tables(load_runs(db, ["dssn/t2"]))
    best = tables["final/miou_best"]
    # supervised 1/8: mean(70, 72, 71) = 71, std = 1; dssn 1/8: mean 80, std 1
    assert best.to_dict("index") == {
        "1_16 (662)": {"supervised": "65.00 (n=1)", "dssn": "78.00 (n=1)"},
        "1_8 (1323)": {"supervised": "71.00 ± 1.00 (n=3)", "dssn": "80.00 ± 1.00 (n=3)"},
    }
    assert tables["final/miou_teacher_best"].loc["1_8 (1323)", "supervised"] == "–"
    assert tables["final/miou_student_last"].loc["1_8 (1323)", "dssn"] == "78.00 ± 1.00 (n=3)"


def test_summary_orders_rows_numerically():
    import pandas as pd

    df = pd.DataFrame(
        {
            "split": ["1_2", "1_16", "1_4"],
            "variant": ["v"] * 3,
            "m": [1.0, 2.0, 3.0],
            "fraction": [0.5, 1 / 16, 0.25],
        }
    )
    assert summarize(df, ["split"], ["variant"], "m")["split"].tolist() == ["1_16", "1_4", "1_2"]


def test_paper_comparison_differences(db):
    cmp = paper_comparison(load_runs(db, ["dssn/t2"]), "table2").set_index(["split", "backbone", "variant"])
    # paper Table 2, R101: 1/8 DSSN 79.58, baseline 70.40; 1/16 DSSN 78.50
    assert cmp.loc[("1_8", "resnet101", "dssn"), "paper"] == "79.58"
    assert cmp.loc[("1_8", "resnet101", "dssn"), "ours − paper"] == "+0.42"
    assert cmp.loc[("1_8", "resnet101", "supervised"), "ours − paper"] == "+0.60"
    assert cmp.loc[("1_16", "resnet101", "dssn"), "ours − paper"] == "-0.50"
    assert cmp.loc[("1_4", "resnet50", "dssn"), "ours"] == "–"


def test_mixed_protocols_refused(db, tmp_path):
    df = load_runs(db, ["dssn/t2"])
    df.loc[0, "protocol"] = "classic"
    with pytest.raises(ReportError, match="mix protocols"):
        study_tables(df)


def test_write_report_files(db, tmp_path):
    written = write_report(load_runs(db, ["dssn/t2"]), tmp_path, "t2", paper_table="table2")
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert names == {
        "tables/t2.md",
        "tables/t2.csv",
        "tables/t2_vs_paper.md",
        "tables/t2_vs_paper.csv",
        "plots/t2_miou_vs_labels.png",
        "plots/t2_per_class.png",
        "metrics/t2.json",
    }
    md = (tmp_path / "tables/t2.md").read_text()
    assert "protocol **blended**" in md and "71.00 ± 1.00 (n=3)" in md
    assert Image.open(tmp_path / "plots/t2_miou_vs_labels.png").size[0] > 100
    metrics = json.loads((tmp_path / "metrics/t2.json").read_text())
    assert metrics == {
        "1_16/resnet101/dssn/miou_best": 78.0,
        "1_16/resnet101/supervised/miou_best": 65.0,
        "1_8/resnet101/dssn/miou_best": 80.0,
        "1_8/resnet101/supervised/miou_best": 71.0,
    }
    assert not list(tmp_path.rglob(".*tmp*"))
