"""MLflow runs -> pandas -> paper-shaped tables (Markdown + CSV), plots and DVC metrics.

Numbers are always mean ± std over seeds with the seed count, for best and last epoch, student
and teacher, plus `final/miou_best` (the paper's selection: best epoch of max(student, teacher)),
and every table states its dataset and protocol; runs of two protocols never share a table.
Everything reads through an explicit `MlflowClient(tracking_uri)`, so no global MLflow state
is set or changed by a report.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from pipeline.config import VARIANTS
from pipeline.io import atomic
from pipeline.paper_numbers import NOTES, PAPER, PROTOCOL_DATASET

# MLflow tag -> column of the runs frame
TAGS = {
    "dssn.study": "study",
    "dssn.dataset": "dataset",
    "dssn.protocol": "protocol",
    "dssn.split": "split",
    "dssn.n_labeled": "n_labeled",
    "dssn.n_train": "n_train",
    "dssn.backbone": "backbone",
    "dssn.variant": "variant",
    "dssn.seed": "seed",
    "dssn.cell": "cell",
    "ray.trial_id": "trial_id",
    "git.commit": "git_commit",
    "dvc.stage": "dvc_stage",
    "mlflow.parentRunId": "parent_run_id",
}
# The study tables, in the order they are written, with what each number means.
METRICS = {
    "final/miou_best": "best epoch of max(student, teacher) — the paper's selection",
    "final/miou_student_best": "student, best epoch",
    "final/miou_teacher_best": "teacher, best epoch",
    "final/miou_student_last": "student, last epoch",
    "final/miou_teacher_last": "teacher, last epoch",
}
PAPER_METRIC = "final/miou_best"
PER_CLASS_PREFIX = "final/iou_student_last/"
# Variants that select pseudo-labels without CPLG, preferred first as dssn's per-class counterpart.
NO_CPLG = ("t4_contrastive", "f4_fixed096", "f4_fixed092", "unimatch", "t4_plain")
DASH = "–"


class ReportError(RuntimeError):
    """Runs that cannot make a table (missing experiment, mixed protocols, nothing finished)."""


class OlderResultError(ReportError):
    """A result file written before result files carried tags, metrics and history: its runs can only
    be read back from the MLflow store."""


# --------------------------------------------------------------------------- loading


def _search_all(client: MlflowClient, experiment_id: str, query: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], query, max_results=5000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _dedupe(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Keep the most recent run per key; rows missing a key part are never merged."""
    has_key = df[keys].notna().all(axis=1)
    kept = df[has_key].drop_duplicates(keys, keep="last")
    return pd.concat([kept, df[~has_key]]).sort_values(["end_time", "start_time"], kind="stable")


def _to_int(col: pd.Series) -> pd.Series:
    return pd.to_numeric(col, errors="coerce").astype("Int64")


def load_runs(
    tracking_uri: str, experiment_names: Sequence[str], run_ids: set[str] | None = None
) -> pd.DataFrame:
    """FINISHED trial runs, one row each: tags as short columns, metrics by name, params as `params.<key>`.

    Retried trials are deduplicated (newest wins) by (study, ray trial id) and by (study, cell), so a
    seed is never counted twice. `run_ids` restricts to exactly the runs behind current results.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    rows = []
    for name in experiment_names:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
            raise ReportError(
                f"MLflow experiment {name!r} not found at {tracking_uri} (existing experiments: {known})"
            )
        query = "tags.role = 'trial' and attributes.status = 'FINISHED'"
        for r in _search_all(client, exp.experiment_id, query):
            if run_ids is not None and r.info.run_id not in run_ids:
                continue
            row: dict[str, Any] = {
                "run_id": r.info.run_id,
                "experiment": name,
                "status": r.info.status,
                "start_time": r.info.start_time,
                "end_time": r.info.end_time,
            }
            row.update({col: r.data.tags.get(tag) for tag, col in TAGS.items()})
            row.update({f"params.{k}": v for k, v in r.data.params.items()})
            row.update(r.data.metrics)
            rows.append(row)
    if not rows:
        raise ReportError(f"no finished trial runs in experiment(s) {', '.join(experiment_names)}")
    df = pd.DataFrame(rows).sort_values(["end_time", "start_time"], kind="stable")
    df = _dedupe(df, ["study", "trial_id"])
    df = _dedupe(df, ["study", "cell"])
    for col in ("n_labeled", "n_train", "seed"):
        df[col] = _to_int(df[col])
    df["fraction"] = (df["n_labeled"] / df["n_train"]).astype(float)
    return df.reset_index(drop=True)


CURVE_KEYS = ("val/miou_student", "val/miou_teacher")


def load_results(files: Sequence[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs frame and the learning curves from finished cells' result files
    (`results/runs/<study>/<cell>.json`, DVC outputs): the same columns as `load_runs` and
    `load_histories`, with no tracking server involved. Raises ReportError naming a file that is
    unreadable or written before result files carried tags, metrics and history."""
    rows, hist = [], []
    for f in sorted(files):
        try:
            r = json.loads(Path(f).read_text())
        except (OSError, ValueError) as e:
            raise ReportError(f"{f}: unreadable result file ({e})") from e
        if not {"tags", "metrics", "history"} <= set(r):
            raise OlderResultError(
                f"{f}: result file without tags/metrics/history (written by an older version)"
            )
        key = r.get("mlflow_run_id") or r["cell"]
        row: dict[str, Any] = {"run_id": key, "status": "FINISHED"}
        row.update({col: r["tags"].get(tag) for tag, col in TAGS.items()})
        row.update({k: v for k, v in r["metrics"].items() if isinstance(v, int | float)})
        rows.append(row)
        hist += [
            {"run_id": key, "key": k, "step": h["epoch"], "value": h[k]}
            for h in r["history"]
            for k in CURVE_KEYS
            if h.get(k) is not None
        ]
    if not rows:
        raise ReportError("no finished cells (result files) to report")
    df = pd.DataFrame(rows)
    for col in ("n_labeled", "n_train", "seed"):
        df[col] = _to_int(df[col])
    df["fraction"] = (df["n_labeled"] / df["n_train"]).astype(float)
    return df.reset_index(drop=True), pd.DataFrame(hist, columns=["run_id", "key", "step", "value"])


def load_histories(
    tracking_uri: str, run_ids: Sequence[str], keys: Sequence[str] = CURVE_KEYS
) -> pd.DataFrame:
    """Per-epoch values of `keys` for each run: long frame (run_id, key, step, value)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    rows = [
        {"run_id": rid, "key": k, "step": m.step, "value": m.value}
        for rid in run_ids
        for k in keys
        for m in client.get_metric_history(rid, k)
    ]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


# --------------------------------------------------------------------------- ordering and formatting


def split_size(split: str) -> float:
    """'1_16' -> 1/16, '92' -> 92: a numeric key for splits named as fractions or counts."""
    s = str(split)
    m = re.fullmatch(r"(\d+)_(\d+)", s)
    if m:
        return float(Fraction(int(m[1]), int(m[2])))
    try:
        return float(s)
    except ValueError:
        return math.inf


def _natural(value: Any) -> tuple:
    """Sort key that puts 'resnet50' before 'resnet101' and variants in their canonical order."""
    if value in VARIANTS:
        return (0, list(VARIANTS).index(value), "")
    parts = re.split(r"(\d+)", str(value))
    return (1, 0, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p))


def format_mean_std(mean: float, std: float, n: int) -> str:
    """'63.41 ± 0.52 (n=3)': a number without its spread and seed count hides how much it means."""
    if not n or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return DASH
    if n == 1 or std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.2f} (n={int(n)})"
    return f"{mean:.2f} ± {std:.2f} (n={int(n)})"


def summarize(df: pd.DataFrame, rows: Sequence[str], cols: Sequence[str], metric: str) -> pd.DataFrame:
    """Mean, std (ddof=1) and count over seeds per (rows, cols), plus the formatted `text`.

    Rows follow the labeled fraction (or size), never string order ('1_4' < '1_8' as strings).
    """
    rows, cols = list(rows), list(cols)
    if metric not in df:
        df = df.assign(**{metric: np.nan})
    g = df.groupby([*rows, *cols], dropna=False)[metric].agg(["mean", "std", "count"]).reset_index()
    if "fraction" in df and df["fraction"].notna().any():
        order = df.groupby(rows, dropna=False)["fraction"].mean()
    elif "n_labeled" in df and df["n_labeled"].notna().any():
        order = df.groupby(rows, dropna=False)["n_labeled"].mean().astype(float)
    elif "split" in rows:
        order = df.groupby(rows, dropna=False)["split"].first().map(split_size)
    else:
        order = None
    if order is not None:
        g = g.merge(order.rename("_order").reset_index(), on=rows, how="left")
    else:
        g["_order"] = 0.0
    keys = [tuple(_natural(v) for v in r) for r in g[[*rows, *cols]].itertuples(index=False)]
    g["_key"] = keys
    g = g.sort_values(["_order", "_key"], kind="stable").drop(columns=["_order", "_key"])
    g["count"] = g["count"].astype(int)
    g["text"] = [format_mean_std(m, s, n) for m, s, n in zip(g["mean"], g["std"], g["count"], strict=True)]
    return g.reset_index(drop=True)


# --------------------------------------------------------------------------- study tables


def _check_protocols(df: pd.DataFrame) -> None:
    for dataset, sub in df.groupby("dataset", dropna=False):
        protocols = sorted(sub["protocol"].dropna().unique())
        if len(protocols) > 1:
            raise ReportError(
                f"runs of dataset {dataset!r} mix protocols {protocols}: a table holds one protocol "
                "(report each study or protocol separately)"
            )


def _row_labels(df: pd.DataFrame) -> pd.Series:
    label = df["split"].astype(str) + " (" + df["n_labeled"].astype(str) + ")"
    if df["dataset"].nunique() > 1:
        label = df["dataset"].astype(str) + "/" + df["protocol"].astype(str) + " " + label
    return label


def _col_labels(df: pd.DataFrame) -> pd.Series:
    if df["backbone"].nunique() > 1:
        return df["backbone"].astype(str) + " / " + df["variant"].astype(str)
    return df["variant"].astype(str)


def study_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One table per metric in METRICS: rows = split (labeled count), columns = [backbone /] variant.

    Each table's `attrs` carries dataset, protocol and metric, since a number without its protocol
    cannot be compared with the paper.
    """
    _check_protocols(df)
    d = df.assign(_row=_row_labels(df), _col=_col_labels(df), _bb=df["backbone"], _v=df["variant"])
    col_order = [
        c
        for _, c in sorted(
            {
                (_natural(b), _natural(v)): c for b, v, c in zip(d["_bb"], d["_v"], d["_col"], strict=True)
            }.items()
        )
    ]
    tables = {}
    for metric, meaning in METRICS.items():
        s = summarize(d, ["_row"], ["_col"], metric)
        row_order = list(dict.fromkeys(s["_row"]))
        table = s.pivot(index="_row", columns="_col", values="text").reindex(
            index=row_order, columns=col_order
        )
        table = table.fillna(DASH)
        table.index.name = "split (labeled)"
        table.columns.name = None
        table.attrs = {
            "dataset": ", ".join(sorted(df["dataset"].dropna().unique())),
            "protocol": ", ".join(sorted(df["protocol"].dropna().unique())),
            "metric": metric,
            "meaning": meaning,
        }
        tables[metric] = table
    return tables


# --------------------------------------------------------------------------- paper comparison


def paper_comparison(df: pd.DataFrame, table_id: str) -> pd.DataFrame:
    """Our mean ± std of the paper's selection next to each cell of a paper table, and ours − paper.

    Cells match on (protocol, split, backbone, variant) within the paper's dataset for that protocol.
    """
    if table_id not in PAPER:
        raise ReportError(f"unknown paper table {table_id!r} (known: {', '.join(PAPER)})")
    keys = sorted(PAPER[table_id], key=lambda k: (_natural(k[2]), split_size(k[1]), _natural(k[3])))
    out = []
    for protocol, split, backbone, variant in keys:
        paper = PAPER[table_id][(protocol, split, backbone, variant)]
        sub = df[
            (df["dataset"] == PROTOCOL_DATASET.get(protocol, protocol))
            & (df["protocol"] == protocol)
            & (df["split"] == split)
            & (df["backbone"] == backbone)
            & (df["variant"] == variant)
        ]
        vals = sub[PAPER_METRIC].dropna() if PAPER_METRIC in sub else pd.Series(dtype=float)
        n = len(vals)
        mean = float(vals.mean()) if n else math.nan
        std = float(vals.std(ddof=1)) if n > 1 else math.nan
        diff = mean - paper if paper is not None and n else math.nan
        out.append(
            {
                "protocol": protocol,
                "split": split,
                "backbone": backbone,
                "variant": variant,
                "paper": DASH if paper is None else f"{paper:.2f}",
                "ours": format_mean_std(mean, std, n),
                "ours − paper": DASH if math.isnan(diff) else f"{diff:+.2f}",
                "paper_miou": math.nan if paper is None else paper,
                "ours_mean": mean,
                "ours_std": std,
                "n": n,
                "diff": diff,
            }
        )
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- writing


def _span(values: pd.Series) -> str:
    v = pd.to_numeric(values, errors="coerce").dropna()
    if v.empty:
        return "?"
    lo, hi = int(v.min()), int(v.max())
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _header(df: pd.DataFrame, study: str) -> list[str]:
    def names(col: str) -> str:
        return ", ".join(sorted((str(x) for x in df[col].dropna().unique()), key=_natural)) or "?"

    seeds = ", ".join(str(s) for s in sorted(df["seed"].dropna().unique())) or "?"
    epochs = _span(df["final/epochs"]) if "final/epochs" in df else "?"
    steps = _span(df["final/steps"]) if "final/steps" in df else "?"
    floor = []
    if "final/miou_background_only" in df:
        v = pd.to_numeric(df["final/miou_background_only"], errors="coerce").dropna()
        if not v.empty:  # one val set per study: the same value in every run
            floor = [
                f"- background only: {v.max():.2f} % mIoU (every pixel predicted background, on the same "
                "val set): the level a model has to clear"
            ]
    return [
        f"# Study `{study}`",
        "",
        f"- dataset: **{names('dataset')}**, protocol: **{names('protocol')}**",
        f"- backbone(s): {names('backbone')}; variants: {names('variant')}",
        f"- seeds: {seeds} ({len(df)} finished trial runs)",
        f"- budget per trial: {epochs} epochs, {steps} steps",
        *floor,
        "",
        "mIoU in %, mean ± std (ddof=1) over seeds, n = seeds; – = no run or no such metric.",
        "",
    ]


def _metric_key(df: pd.DataFrame, r: dict[str, Any]) -> str:
    """`<split>/<variant>/miou_best`, qualified by dataset or backbone only when a study holds several."""
    parts = [r["dataset"]] if df["dataset"].nunique() > 1 else []
    parts.append(r["split"])
    if df["backbone"].nunique() > 1:
        parts.append(r["backbone"])
    parts += [r["variant"], "miou_best"]
    return "/".join(str(p) for p in parts)


def write_report(
    df: pd.DataFrame,
    out_dir: Path,
    study: str,
    paper_table: str | None = None,
    histories: pd.DataFrame | None = None,
) -> list[Path]:
    """tables/<study>.{md,csv}, plots/<study>_*.png (+ tables/<study>_vs_paper.*);
    with `histories` (see `load_histories`) also the learning curves plots/<study>_curves.png."""
    out_dir = Path(out_dir)
    tables = study_tables(df)
    lines = _header(df, study)
    for metric, table in tables.items():
        lines += [f"## {METRICS[metric]} (`{metric}`)", "", table.to_markdown(disable_numparse=True), ""]
    lines += diagnostics(df)
    text = "\n".join(lines)
    written = [atomic(out_dir / "tables" / f"{study}.md", lambda p: p.write_text(text, encoding="utf-8"))]

    long = pd.concat(
        [
            summarize(df, ["dataset", "protocol", "split", "n_labeled"], ["backbone", "variant"], m).assign(
                metric=m
            )
            for m in METRICS
        ],
        ignore_index=True,
    )
    long.insert(0, "study", study)
    written.append(atomic(out_dir / "tables" / f"{study}.csv", lambda p: long.to_csv(p, index=False)))

    if paper_table:
        cmp = paper_comparison(df, paper_table)
        shown = cmp[["protocol", "split", "backbone", "variant", "paper", "ours", "ours − paper"]]
        notes = [f"- {n}" for n in NOTES.get(paper_table, [])]
        body = [
            *_header(df, study),
            f"## Ours vs the paper's {paper_table} (`{PAPER_METRIC}`)",
            "",
            shown.to_markdown(index=False, disable_numparse=True),
            "",
            *(["Notes:", "", *notes, ""] if notes else []),
        ]
        cmp_text = "\n".join(body)
        written.append(
            atomic(
                out_dir / "tables" / f"{study}_vs_paper.md",
                lambda p: p.write_text(cmp_text, encoding="utf-8"),
            )
        )
        written.append(
            atomic(out_dir / "tables" / f"{study}_vs_paper.csv", lambda p: cmp.to_csv(p, index=False))
        )

    written += _plots(df, out_dir / "plots", study)
    if histories is not None and not histories.empty:
        written.append(_curves(df, histories, out_dir / "plots", study))

    return written


def study_metrics(df: pd.DataFrame) -> dict[str, float]:
    """The paper's number (best epoch of max(student, teacher), mean over seeds) per cell group:
    what `dvc metrics show/diff` and `dvc exp show` compare."""
    best = summarize(df, ["dataset", "split"], ["backbone", "variant"], PAPER_METRIC)
    return {
        _metric_key(df, r): round(float(r["mean"]), 4)
        for r in best.to_dict("records")
        if not math.isnan(r["mean"])
    }


def write_plot_data(df: pd.DataFrame, hist: pd.DataFrame | None, out_dir: Path, study: str) -> list[Path]:
    """CSV series for `dvc plots show/diff` (declared in dvc.yaml), one file per series so that DVC
    overlays revisions and experiments on the same axes: mIoU vs labeled images per backbone/variant
    (`miou_vs_labels/`), validation mIoU per epoch (`curves/`) and last-epoch IoU per class
    (`per_class/`), each the mean over seeds."""
    out_dir, written = Path(out_dir), []

    def csv(path: Path, frame: pd.DataFrame) -> None:
        written.append(atomic(path, lambda p: frame.to_csv(p, index=False, float_format="%.4f")))

    for (bb, v), g in df.groupby(["backbone", "variant"]):
        agg = g.groupby(["split", "n_labeled"])[PAPER_METRIC].agg(["mean", "std", "count"]).reset_index()
        agg = agg.rename(columns={"mean": "miou", "count": "seeds"}).sort_values("n_labeled")
        csv(
            out_dir / "miou_vs_labels" / f"{study}-{bb}-{v}.csv",
            agg[["n_labeled", "split", "miou", "std", "seeds"]],
        )
    if hist is not None and not hist.empty:
        wide = hist.pivot_table(index=["run_id", "step"], columns="key", values="value").reset_index()
        wide = wide.merge(df[["run_id", "split", "backbone", "variant"]], on="run_id")
        cols = [c for c in CURVE_KEYS if c in wide]
        for (sp, bb, v), g in wide.groupby(["split", "backbone", "variant"]):
            mean = g.groupby("step")[cols].mean().reset_index().rename(columns={"step": "epoch"})
            mean.columns = [c.removeprefix("val/") for c in mean.columns]
            csv(out_dir / "curves" / f"{study}-{sp}-{bb}-{v}.csv", mean)
    per_class = _prefixed(df, PER_CLASS_PREFIX)
    if per_class:
        for (sp, bb, v), g in df.groupby(["split", "backbone", "variant"]):
            means = g[list(per_class)].mean()
            frame = pd.DataFrame({"class": list(per_class.values()), "iou": means.to_numpy(dtype=float)})
            csv(out_dir / "per_class" / f"{study}-{sp}-{bb}-{v}.csv", frame)
    return written


PL_KEPT_PREFIX = "pseudo_kept/"
PL_KEPT_TEACHER_PREFIX = "pseudo_kept_teacher/"


def _by_cell_means(df: pd.DataFrame, cols: list[str], scale: float = 1.0) -> str:
    """Markdown table of the mean over seeds per (split, [backbone,] variant), in the study order."""
    keys = ["split", "backbone", "variant"] if df["backbone"].nunique() > 1 else ["split", "variant"]
    g = df.groupby(keys, dropna=False)
    means = g[cols].mean() * scale
    order = sorted(means.index, key=lambda k: (split_size(k[0]), *(_natural(x) for x in k[1:])))
    means = means.reindex(order)
    means.index = [" / ".join(str(x) for x in k) for k in means.index]
    means.index.name = " / ".join(keys)
    means.insert(0, "n", [str(n) for n in g.size().reindex(order)])
    return means.to_markdown(floatfmt=".1f")


def _prefixed(df: pd.DataFrame, prefix: str) -> dict[str, str]:
    """Columns named `<prefix><name>`, mapped to `<name>` (per-class metrics)."""
    return {c: c.removeprefix(prefix) for c in map(str, df.columns) if c.startswith(prefix)}


def diagnostics(df: pd.DataFrame) -> list[str]:
    """Per-class IoU and pseudo-label statistics: where a method wins or loses, not just by how much."""
    lines: list[str] = []
    per_class = _prefixed(df, PER_CLASS_PREFIX)
    if per_class:
        lines += [
            "## Per-class IoU, student, last epoch (mean over the n seeds)",
            "",
            _by_cell_means(df.rename(columns=per_class), list(per_class.values())),
            "",
        ]
    for prefix, acc, title, what in (
        (
            PL_KEPT_TEACHER_PREFIX,
            "train/pl_accuracy_teacher",
            "Pseudo-labels of the teacher in the last epoch, image level (mean over the n seeds)",
            "the targets of the two strong views (`loss_s`): the EMA teacher's prediction on the weak view, "
            "the partner's inside the CutMix box (UniMatch: the student's). Per class: % of the unlabeled "
            "pixels predicted as that class that the selection (CPLG, a fixed or an adaptive threshold) keeps",
        ),
        (
            PL_KEPT_PREFIX,
            "train/pl_accuracy",
            "Pseudo-labels of the student's weak view in the last epoch, feature level (mean over the n seeds)",
            "the targets of the feature-dropout views (`loss_fp`): the student's own clean prediction. Per "
            "class: % of the unlabeled pixels predicted as that class that the selection keeps",
        ),
    ):
        kept = _prefixed(df, prefix)
        if kept and acc in df and df[acc].notna().any():
            cols = {acc: "accuracy of kept", **kept}
            semi = df[df[acc].notna()].rename(columns=cols)
            lines += [
                f"## {title}",
                "",
                f"{what}; `accuracy of kept`: % of kept pixels whose pseudo-label equals the ground truth.",
                "",
                _by_cell_means(semi, list(cols.values()), scale=100.0),
                "",
            ]
    return lines


def _per_class_variants(df: pd.DataFrame) -> list[str]:
    """dssn against one variant without CPLG when both exist (Fig. 5's point), else every variant."""
    present = set(df["variant"].dropna())
    if "dssn" in present:
        for v in NO_CPLG:
            if v in present:
                return ["dssn", v]
    return sorted(present, key=_natural)


def _plots(df: pd.DataFrame, plot_dir: Path, study: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out = []
    multi_bb = df["backbone"].nunique() > 1
    s = summarize(df, ["split"], ["backbone", "variant"], PAPER_METRIC)
    n_lab = df.groupby("split")["n_labeled"].first().astype(float)
    s["x"] = s["split"].map(n_lab)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for (bb, variant), g in s.dropna(subset=["mean"]).groupby(["backbone", "variant"], sort=False):
        g = g.sort_values("x")
        ax.errorbar(
            g["x"],
            g["mean"],
            yerr=g["std"].fillna(0.0),
            marker="o",
            capsize=3,
            label=f"{variant} ({bb})" if multi_bb else variant,
        )
    ax.set_xscale("log")
    ticks = s.drop_duplicates("split").dropna(subset=["x"]).sort_values("x")
    ax.set_xticks(
        ticks["x"].tolist(), [f"{n:.0f}\n{sp}" for n, sp in zip(ticks["x"], ticks["split"], strict=True)]
    )
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("labeled images")
    ax.set_ylabel("mIoU (%), best epoch of max(student, teacher)")
    datasets = ", ".join(sorted(df["dataset"].dropna().unique()))
    protocols = ", ".join(sorted(df["protocol"].dropna().unique()))
    ax.set_title(f"{study}: {datasets} ({protocols}), mean ± std over seeds", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(atomic(plot_dir / f"{study}_miou_vs_labels.png", lambda p: fig.savefig(p, format="png")))
    plt.close(fig)

    class_cols = _prefixed(df, PER_CLASS_PREFIX)
    per_class, names = list(class_cols), list(class_cols.values())
    if not per_class:
        return out
    variants = _per_class_variants(df)
    sub = df[df["variant"].isin(variants)]
    # the smallest split on which all chosen variants ran: where long-tailed classes suffer most
    full = sub.groupby("split")["variant"].nunique()
    candidates = [sp for sp in full.index if full[sp] == len(variants)] or list(full.index)
    split = min(candidates, key=lambda sp: float(sub.loc[sub["split"] == sp, "fraction"].mean()))
    sub = sub[sub["split"] == split]
    means = sub.groupby("variant")[per_class].mean().reindex(variants).dropna(how="all")
    stds = sub.groupby("variant")[per_class].std(ddof=1).reindex(means.index)
    x = np.arange(len(names))
    width = 0.8 / max(len(means), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names) + 2), 4), dpi=110)
    for i, variant in enumerate(means.index):
        ax.bar(
            x + (i - (len(means) - 1) / 2) * width,
            means.loc[variant].to_numpy(dtype=float),
            width,
            yerr=stds.loc[variant].fillna(0.0).to_numpy(dtype=float),
            capsize=2,
            label=variant,
        )
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%), student, last epoch")
    ax.set_title(f"{study}: per-class IoU, split {split} ({datasets}, {protocols})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(atomic(plot_dir / f"{study}_per_class.png", lambda p: fig.savefig(p, format="png")))
    plt.close(fig)
    return out


def _curves(df: pd.DataFrame, hist: pd.DataFrame, plot_dir: Path, study: str) -> Path:
    """Validation mIoU of max(student, teacher) per epoch, mean over seeds, one line per variant,
    on the smallest split: shows when a semi-supervised variant catches up, not just where it ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = hist.pivot_table(index=["run_id", "step"], columns="key", values="value").max(axis=1)
    best = (
        best.rename("miou").reset_index().merge(df[["run_id", "split", "variant", "fraction"]], on="run_id")
    )
    split = best.loc[best["fraction"].idxmin(), "split"]
    sub = best[best["split"] == split]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for variant in sorted(sub["variant"].unique(), key=_natural):
        g = sub[sub["variant"] == variant].groupby("step")["miou"].agg(["mean", "std", "count"])
        ax.plot(g.index, g["mean"], marker=".", label=f"{variant} (n={int(g['count'].max())})")
        ax.fill_between(g.index, g["mean"] - g["std"].fillna(0), g["mean"] + g["std"].fillna(0), alpha=0.12)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mIoU (%), max(student, teacher)")
    ax.set_title(f"{study}: learning curves, split {split}, mean ± std over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = atomic(plot_dir / f"{study}_curves.png", lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def publish(doc: Path, study: str, report_md: str, plots: Sequence[Path]) -> Path:
    """Put a study's generated report into a committed document between markers, keeping the
    hand-written text around them; plots are copied beside it (`<doc stem>/`)."""
    import shutil

    doc = Path(doc)
    img_dir = doc.parent / doc.stem
    links = []
    for p in plots:
        dest = img_dir / Path(p).name
        atomic(dest, lambda t, src=Path(p): shutil.copyfile(src, t))
        links.append(f"![{Path(p).stem}]({img_dir.name}/{Path(p).name})")
    body = re.sub(r"^(#+) ", r"#\1 ", report_md, flags=re.M)  # one level below the document's title
    begin, end = f"<!-- begin generated: {study} -->", f"<!-- end generated: {study} -->"
    block = "\n".join([begin, "", body.strip(), "", *links, "", end])
    text = doc.read_text(encoding="utf-8") if doc.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text else "") + block + "\n"
    return atomic(doc, lambda t: t.write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.report --tracking-uri … --study demo [--study …] --out results`."""
    p = argparse.ArgumentParser(
        prog="python -m pipeline.report", description="Turn MLflow study runs into tables and plots."
    )
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    p.add_argument("--study", action="append", required=True, help="study name (experiment dssn/<study>)")
    p.add_argument("--out", default="results", type=Path)
    p.add_argument("--paper-table", choices=sorted(PAPER), help="also compare with this paper table")
    args = p.parse_args(argv)
    if not args.tracking_uri:
        p.error("--tracking-uri is required (or set MLFLOW_TRACKING_URI)")
    try:
        for study in args.study:
            study = study.removeprefix("dssn/")
            df = load_runs(args.tracking_uri, [f"dssn/{study}"])
            for path in write_report(df, args.out, study, args.paper_table):
                print(path)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
