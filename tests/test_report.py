"""The report turns a real MLflow sqlite DB into exactly the hand-computed tables, files and metrics."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipeline.report import (
    ReportError,
    diagnostics,
    format_mean_std,
    load_histories,
    load_runs,
    main,
    paper_comparison,
    publish,
    study_metrics,
    study_tables,
    summarize,
    write_plot_data,
    write_report,
)

N_TRAIN = 10582
N_LABELED = {"1_4": 2646, "1_8": 1323}
# (split, variant, seed) -> final/miou_best. Hand-computed summaries (ddof=1):
#   1_4 supervised 74, 75, 76      -> 75.00 ± 1.00     1_8 supervised 70, 71, 72 -> 71.00 ± 1.00
#   1_4 dssn       81, 82, 83.5    -> 82.17 ± 1.26     1_8 dssn       78, 80, 82 -> 80.00 ± 2.00
#     (mean 82.1667; squared deviations 1.3611 + 0.0278 + 1.7778 = 3.1667; /2 = 1.5833; sqrt = 1.2583)
#   1_8 unimatch   78 (one seed)   -> 78.00 (n=1)
# The 1_4 runs are logged first: "1_4" < "1_8" as strings, but 1/8 < 1/4 labeled.
BEST = {
    ("1_4", "supervised", 0): 74.0,
    ("1_4", "supervised", 1): 75.0,
    ("1_4", "supervised", 2): 76.0,
    ("1_4", "dssn", 0): 81.0,
    ("1_4", "dssn", 1): 82.0,
    ("1_4", "dssn", 2): 83.5,
    ("1_8", "supervised", 0): 70.0,
    ("1_8", "supervised", 1): 71.0,
    ("1_8", "supervised", 2): 72.0,
    ("1_8", "dssn", 0): 78.0,
    ("1_8", "dssn", 1): 80.0,
    ("1_8", "dssn", 2): 82.0,
    ("1_8", "unimatch", 0): 78.0,
}
T0 = 1_700_000_000_000  # ms; explicit times make "most recent" deterministic


def _metrics(variant: str, best: float, seed: int) -> dict[str, float]:
    """Student trails the teacher by 0.5 at its best; last epochs are 2 (student) / 1.5 (teacher) lower."""
    m = {
        "final/miou_best": best,
        "final/miou_student_best": best if variant != "dssn" else best - 0.5,
        "final/miou_student_last": best - 2.0,
        "final/epochs": 2.0,
        "final/steps": 20.0,
        "final/miou_background_only": 3.5,
        "final/iou_student_last/background": 90.0 + seed,
        "final/iou_student_last/aeroplane": best - 10.0,
    }
    if variant == "dssn":  # supervised and unimatch have no teacher
        m["final/miou_teacher_best"] = best
        m["final/miou_teacher_last"] = best - 1.5
    return m


class _Logger:
    def __init__(self, uri: str):
        self.c = MlflowClient(tracking_uri=uri)
        self.t = T0

    def experiment(self, study: str) -> tuple[str, str]:
        exp = self.c.create_experiment(f"dssn/{study}")
        parent = self.run(exp, {"role": "parent", "dssn.study": study}, {"final/miou_best": 99.0})
        return exp, parent

    def run(self, exp: str, tags: dict[str, str], metrics: dict[str, float], status: str = "FINISHED") -> str:
        self.t += 1000
        run_id = self.c.create_run(exp, start_time=self.t, tags=tags).info.run_id
        for k, v in metrics.items():
            self.c.log_metric(run_id, k, v, timestamp=self.t, step=0)
        self.c.log_param(run_id, "method.r", "0.96")
        if status != "RUNNING":
            self.c.set_terminated(run_id, status, end_time=self.t + 500)
        return run_id

    def trial(
        self, exp: str, parent: str, study: str, split: str, variant: str, seed: int, best: float, **kw
    ):
        tags = {
            "role": "trial",
            "mlflow.parentRunId": parent,
            "dssn.study": study,
            "dssn.dataset": kw.pop("dataset", "voc"),
            "dssn.protocol": kw.pop("protocol", "blended"),
            "dssn.split": split,
            "dssn.n_labeled": str(kw.pop("n_labeled", N_LABELED.get(split))),
            "dssn.n_train": str(N_TRAIN),
            "dssn.backbone": "resnet101",
            "dssn.variant": variant,
            "dssn.seed": str(seed),
            "dssn.cell": kw.pop("cell", f"{split}-resnet101-{variant}-s{seed}"),
            "ray.trial_id": kw.pop("trial_id", f"tr-{split}-{variant}-{seed}"),
            "git.commit": "abc123",
            "dvc.stage": f"train@{study}",
        }
        tags = {k: v for k, v in tags.items() if v is not None}
        return self.run(exp, tags, _metrics(variant, best, seed), kw.pop("status", "FINISHED"))


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One sqlite DB per module (each creation runs the migrations, ~2 s)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        log = _Logger(uri)
        exp, parent = log.experiment("t2")
        # an older retry of 1_4/supervised/s0 under another trial id (a rerun of the study): same cell
        log.trial(exp, parent, "t2", "1_4", "supervised", 0, 0.0, trial_id="old-trial")
        # an older attempt of 1_8/dssn/s2 with the same trial id and no cell tag
        log.trial(exp, parent, "t2", "1_8", "dssn", 2, 10.0, cell=None)
        for (split, variant, seed), best in BEST.items():
            log.trial(exp, parent, "t2", split, variant, seed, best)
        # newest of all, but not FINISHED: ignored
        log.trial(exp, parent, "t2", "1_8", "dssn", 1, 99.0, status="FAILED", trial_id="failed")
        log.trial(exp, parent, "t2", "1_4", "dssn", 0, 99.0, status="RUNNING", trial_id="running")
        log.c.set_terminated(parent, "FINISHED")

        exp_m, parent_m = log.experiment("mixed")
        log.trial(exp_m, parent_m, "mixed", "1_8", "dssn", 0, 75.0)
        log.trial(exp_m, parent_m, "mixed", "92", "dssn", 0, 70.0, protocol="classic", n_labeled=92)

        log.experiment("empty")  # a parent run only
        yield uri
        mlflow.end_run()


@pytest.fixture(scope="module")
def runs(db) -> pd.DataFrame:
    return load_runs(db, ["dssn/t2"])


def test_load_runs_keeps_finished_trials_deduped(db, runs):
    before = mlflow.get_tracking_uri()
    df = load_runs(db, ["dssn/t2"])
    assert mlflow.get_tracking_uri() == before  # nothing set globally
    assert len(df) == len(BEST)
    by_key = df.set_index(["split", "variant", "seed"])["final/miou_best"].to_dict()
    assert by_key == BEST  # dedupe kept the newest; FAILED/RUNNING/parent runs are gone
    assert pd.api.types.is_integer_dtype(df["n_labeled"])
    row = df[(df.split == "1_8") & (df.variant == "dssn") & (df.seed == 0)].iloc[0]
    assert row["n_labeled"] == 1323
    assert row["fraction"] == pytest.approx(1323 / 10582)
    assert row["params.method.r"] == "0.96"
    assert row["protocol"] == "blended" and row["git_commit"] == "abc123"


def test_load_runs_missing_and_empty_experiments(db):
    with pytest.raises(ReportError, match=r"'dssn/nope' not found.*existing experiments: .*dssn/t2"):
        load_runs(db, ["dssn/nope"])
    with pytest.raises(ReportError, match="no finished trial runs"):
        load_runs(db, ["dssn/empty"])
    assert len(load_runs(db, ["dssn/t2", "dssn/mixed"])) == len(BEST) + 2


def test_format_mean_std():
    assert format_mean_std(63.4149, 0.5151, 3) == "63.41 ± 0.52 (n=3)"
    assert format_mean_std(63.4149, float("nan"), 1) == "63.41 (n=1)"
    assert format_mean_std(float("nan"), float("nan"), 0) == "–"


def test_summarize_orders_rows_numerically():
    frac = pd.DataFrame(
        {
            "split": ["1_2", "1_16", "1_4", "1_8"],
            "variant": ["v"] * 4,
            "m": [1.0, 2.0, 3.0, 4.0],
            "fraction": [1 / 2, 1 / 16, 1 / 4, 1 / 8],
        }
    )
    assert summarize(frac, ["split"], ["variant"], "m")["split"].tolist() == ["1_16", "1_8", "1_4", "1_2"]
    counts = pd.DataFrame({"split": ["1464", "92", "183"], "variant": ["v"] * 3, "m": [1.0, 2.0, 3.0]})
    assert summarize(counts, ["split"], ["variant"], "m")["split"].tolist() == ["92", "183", "1464"]


def test_summarize_mean_std_count(runs):
    s = summarize(runs, ["split"], ["variant"], "final/miou_best").set_index(["split", "variant"])
    assert s.loc[("1_4", "dssn"), "mean"] == pytest.approx(82.1666667)
    assert s.loc[("1_4", "dssn"), "std"] == pytest.approx(1.2583057)
    assert s.loc[("1_8", "unimatch"), "count"] == 1
    assert pd.isna(s.loc[("1_8", "unimatch"), "std"])


def test_study_tables_exact_contents(runs):
    tables = study_tables(runs)
    assert list(tables) == [
        "final/miou_best",
        "final/miou_student_best",
        "final/miou_teacher_best",
        "final/miou_student_last",
        "final/miou_teacher_last",
    ]
    best = tables["final/miou_best"]
    assert best.index.tolist() == ["1_8 (1323)", "1_4 (2646)"]
    assert best.columns.tolist() == ["supervised", "unimatch", "dssn"]
    assert best.to_dict("index") == {
        "1_8 (1323)": {
            "supervised": "71.00 ± 1.00 (n=3)",
            "unimatch": "78.00 (n=1)",
            "dssn": "80.00 ± 2.00 (n=3)",
        },
        "1_4 (2646)": {"supervised": "75.00 ± 1.00 (n=3)", "unimatch": "–", "dssn": "82.17 ± 1.26 (n=3)"},
    }
    assert best.attrs["dataset"] == "voc" and best.attrs["protocol"] == "blended"
    assert tables["final/miou_student_best"].loc["1_8 (1323)", "dssn"] == "79.50 ± 2.00 (n=3)"
    assert tables["final/miou_teacher_best"].loc["1_8 (1323)"].tolist() == ["–", "–", "80.00 ± 2.00 (n=3)"]
    assert tables["final/miou_student_last"].loc["1_4 (2646)", "supervised"] == "73.00 ± 1.00 (n=3)"
    assert tables["final/miou_teacher_last"].loc["1_8 (1323)", "dssn"] == "78.50 ± 2.00 (n=3)"


def test_mixed_protocols_refused(db):
    with pytest.raises(ReportError, match=r"dataset 'voc' mix protocols \['blended', 'classic'\]"):
        study_tables(load_runs(db, ["dssn/mixed"]))


def test_paper_comparison_differences(runs):
    cmp = paper_comparison(runs, "table2").set_index(["split", "backbone", "variant"])
    # paper Table 2, ResNet-101: 1/8 DSSN 79.58, Baseline 70.40, Unimatch 78.40; 1/4 DSSN 79.45
    assert cmp.loc[("1_8", "resnet101", "dssn"), ["paper", "ours", "ours − paper"]].tolist() == [
        "79.58",
        "80.00 ± 2.00 (n=3)",
        "+0.42",
    ]
    assert cmp.loc[("1_8", "resnet101", "supervised"), "ours − paper"] == "+0.60"
    assert cmp.loc[("1_8", "resnet101", "unimatch"), "ours − paper"] == "-0.40"
    assert cmp.loc[("1_4", "resnet101", "dssn"), "ours − paper"] == "+2.72"  # 82.1667 - 79.45
    assert cmp.loc[("1_4", "resnet101", "dssn"), "diff"] == pytest.approx(82.1666667 - 79.45)
    assert cmp.loc[("1_2", "resnet101", "unimatch"), ["paper", "ours", "ours − paper"]].tolist() == ["–"] * 3
    assert cmp.loc[("1_16", "resnet50", "dssn"), ["paper", "ours"]].tolist() == ["76.74", "–"]
    # rows follow backbone, then labeled fraction
    assert cmp.index.get_level_values("split")[:5].tolist() == ["1_16"] * 4 + ["1_8"]  # + supervised_ref
    # a synthetic run never matches a VOC cell of the paper
    assert (paper_comparison(runs.assign(dataset="synthetic"), "table2")["ours"] == "–").all()
    with pytest.raises(ReportError, match="unknown paper table"):
        paper_comparison(runs, "table9")


def test_paper_figures_without_numbers(runs):
    fig4 = paper_comparison(runs, "fig4").set_index("variant")
    assert fig4.loc["f4_fixed092", "paper"] == "–"
    assert fig4.loc["dssn", "ours − paper"] == "+0.42"


def test_write_report_files(runs, tmp_path):
    written = write_report(runs, tmp_path, "t2", paper_table="table2")
    assert {p.relative_to(tmp_path).as_posix() for p in written} == {
        "tables/t2.md",
        "tables/t2.csv",
        "tables/t2_vs_paper.md",
        "tables/t2_vs_paper.csv",
        "plots/t2_miou_vs_labels.png",
        "plots/t2_per_class.png",
    }
    md = (tmp_path / "tables/t2.md").read_text()
    for text in (
        "# Study `t2`",
        "dataset: **voc**, protocol: **blended**",
        "backbone(s): resnet101",
        "seeds: 0, 1, 2",
        "budget per trial: 2 epochs, 20 steps",
        "background only: 3.50 % mIoU",
        "82.17 ± 1.26 (n=3)",
    ):
        assert text in md
    assert md.index("1_8 (1323)") < md.index("1_4 (2646)")
    csv = pd.read_csv(tmp_path / "tables/t2.csv", dtype={"split": str})
    row = csv[(csv.metric == "final/miou_best") & (csv.split == "1_4") & (csv.variant == "dssn")].iloc[0]
    assert (row["dataset"], row["protocol"], row["n_labeled"], row["count"]) == ("voc", "blended", 2646, 3)
    assert "+0.42" in (tmp_path / "tables/t2_vs_paper.md").read_text()
    for png in ("t2_miou_vs_labels.png", "t2_per_class.png"):
        with Image.open(tmp_path / "plots" / png) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 100
    assert study_metrics(runs) == {
        "1_4/dssn/miou_best": 82.1667,
        "1_4/supervised/miou_best": 75.0,
        "1_8/dssn/miou_best": 80.0,
        "1_8/supervised/miou_best": 71.0,
        "1_8/unimatch/miou_best": 78.0,
    }
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # atomic writes left nothing


def test_plot_data_for_dvc_one_file_per_series(runs, tmp_path):
    """CSV series `dvc plots` overlays across revisions: mean over seeds, per backbone/variant."""
    hist = pd.DataFrame(
        [
            {"run_id": rid, "key": k, "step": e, "value": v + e}
            for rid, v in zip(runs["run_id"], runs["final/miou_best"], strict=True)
            for k in ("val/miou_student", "val/miou_teacher")
            for e in (1, 2)
        ]
    )
    written = write_plot_data(runs, hist, tmp_path, "t2")
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert "miou_vs_labels/t2-resnet101-dssn.csv" in names
    assert "curves/t2-1_4-resnet101-dssn.csv" in names
    labels = pd.read_csv(tmp_path / "miou_vs_labels/t2-resnet101-dssn.csv", dtype={"split": str})
    assert labels["n_labeled"].tolist() == [1323, 2646]  # sorted by labeled count
    assert labels["miou"].tolist() == [80.0, 82.1667] and labels["seeds"].tolist() == [3, 3]
    curve = pd.read_csv(tmp_path / "curves/t2-1_4-resnet101-dssn.csv")
    assert list(curve.columns) == ["epoch", "miou_student", "miou_teacher"]
    assert curve["miou_student"].tolist() == pytest.approx([83.1667, 84.1667], abs=1e-4)


def test_main_exit_codes(db, tmp_path, capsys):
    assert main(["--tracking-uri", db, "--study", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "'dssn/nope' not found" in err and "dssn/t2" in err
    assert main(["--tracking-uri", db, "--study", "empty", "--out", str(tmp_path)]) == 2
    assert "no finished trial runs" in capsys.readouterr().err
    assert (
        main(["--tracking-uri", db, "--study", "t2", "--out", str(tmp_path), "--paper-table", "table2"]) == 0
    )
    assert (tmp_path / "tables/t2_vs_paper.csv").exists()
    assert "tables/t2.md" in capsys.readouterr().out


def test_diagnostics_tables_hand_computed(runs):
    lines = "\n".join(diagnostics(runs))
    # 1_4/dssn: background 90, 91, 92 -> 91.0; aeroplane = best - 10 = 71, 72, 73.5 -> 72.17
    assert "| 1_4 / dssn        |   3 |         91.0 |        72.2 |" in lines
    assert "| 1_8 / unimatch    |   1 |         90.0 |        68.0 |" in lines
    assert "Pseudo-labels" not in lines  # no semi-supervised statistics logged in this study
    semi = pd.DataFrame(
        {
            "split": ["1_8", "1_8", "1_8"],
            "backbone": ["resnet101"] * 3,
            "variant": ["dssn", "dssn", "supervised"],
            "train/pl_accuracy": [0.9, 0.8, float("nan")],
            "pseudo_kept/background": [0.5, 0.7, float("nan")],
            "pseudo_kept/person": [0.0, 0.25, float("nan")],
        }
    )
    table = "\n".join(diagnostics(semi))
    assert "| 1_8 / dssn        |   2 |               85.0 |         60.0 |     12.5 |" in table
    assert "supervised" not in table  # only variants that pseudo-label
    assert "student's weak view" in table and "of the teacher" not in table
    both = semi.assign(
        **{
            "train/pl_accuracy_teacher": [1.0, 0.5, float("nan")],
            "pseudo_kept_teacher/background": [0.2, 0.4, float("nan")],
            "pseudo_kept_teacher/person": [0.0, 0.0, float("nan")],
        }
    )
    text = "\n".join(diagnostics(both))
    teacher, student = text.split("Pseudo-labels of the student")
    assert "Pseudo-labels of the teacher" in teacher and "`loss_s`" in teacher
    assert "| 1_8 / dssn        |   2 |               75.0 |         30.0 |      0.0 |" in teacher
    assert "| 1_8 / dssn        |   2 |               85.0 |         60.0 |     12.5 |" in student


def test_learning_curves_from_metric_history(db, runs, tmp_path):
    rid = runs.loc[(runs.split == "1_8") & (runs.variant == "dssn") & (runs.seed == 0), "run_id"].item()
    hist = load_histories(db, [rid], keys=["final/miou_best"])
    assert hist[["key", "step", "value"]].values.tolist() == [["final/miou_best", 0, 78.0]]
    rows = []
    for r in runs.itertuples():
        for epoch in (1, 2):
            rows += [
                {"run_id": r.run_id, "key": "val/miou_student", "step": epoch, "value": 10.0 * epoch},
                {"run_id": r.run_id, "key": "val/miou_teacher", "step": epoch, "value": 12.0 * epoch},
            ]
    written = write_report(runs, tmp_path, "t2", histories=pd.DataFrame(rows))
    curves = tmp_path / "plots" / "t2_curves.png"
    assert curves in written
    with Image.open(curves) as im:
        assert im.format == "PNG"


def test_publish_replaces_only_its_block(tmp_path):
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    png = tmp_path / "a_curves.png"
    png.write_bytes(b"png")
    doc.write_text("# Findings\n\nmy analysis\n")
    publish(doc, "ev", "# Study `ev`\n\n## table\n\n| a |\n", [png])
    first = doc.read_text()
    assert first.startswith("# Findings\n\nmy analysis\n\n<!-- begin generated: ev -->")
    assert "## Study `ev`" in first and "### table" in first  # demoted below the document's title
    assert "![a_curves](results/a_curves.png)" in first
    assert (tmp_path / "docs" / "results" / "a_curves.png").read_bytes() == b"png"
    doc.write_text(first + "\nlater notes\n")
    publish(doc, "ev", "# Study `ev`\n\n| b |\n", [png])
    second = doc.read_text()
    assert "| b |" in second and "| a |" not in second
    assert second.count("<!-- begin generated: ev -->") == 1
    assert second.startswith("# Findings\n\nmy analysis") and second.endswith("later notes\n")
