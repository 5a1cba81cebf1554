"""MLflow runs -> pandas -> paper-shaped tables (Markdown + CSV), plots and DVC metrics.

Numbers are always mean ± std over seeds with the seed count, for best and last epoch, student
and teacher, plus `final/miou_best` (the paper's selection: best epoch of max(student, teacher)),
and every table states its dataset and protocol; runs of two protocols never share a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from pipeline.config import VARIANTS
from pipeline.paper_numbers import PAPER

TAGS = {
    "dssn.study": "study",
    "dssn.dataset": "dataset",
    "dssn.protocol": "protocol",
    "dssn.split": "split",
    "dssn.backbone": "backbone",
    "dssn.variant": "variant",
    "dssn.seed": "seed",
    "dssn.cell": "cell",
    "dssn.n_labeled": "n_labeled",
    "dssn.n_train": "n_train",
    "ray.trial_id": "trial_id",
}
METRICS = {
    "final/miou_best": "best epoch, max(student, teacher) — the paper's selection",
    "final/miou_student_best": "student, best epoch",
    "final/miou_teacher_best": "teacher, best epoch",
    "final/miou_student_last": "student, last epoch",
    "final/miou_teacher_last": "teacher, last epoch",
}


class ReportError(RuntimeError):
    """Runs that cannot make a table (missing experiment, mixed protocols, nothing finished)."""


def load_runs(
    tracking_uri: str, experiment_names: Sequence[str], run_ids: set[str] | None = None
) -> pd.DataFrame:
    """FINISHED trial runs as one row each (tags as columns, metrics by name), deduplicated."""
    client = MlflowClient(tracking_uri=tracking_uri)
    rows = []
    for name in experiment_names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = ", ".join(e.name for e in client.search_experiments()) or "none"
            raise ReportError(f"MLflow experiment {name!r} not found at {tracking_uri} (existing: {known})")
        runs = client.search_runs(
            [exp.experiment_id], "tags.role = 'trial' and attributes.status = 'FINISHED'", max_results=50_000
        )
        for r in runs:
            if run_ids is not None and r.info.run_id not in run_ids:
                continue
            row = {"run_id": r.info.run_id, "start_time": r.info.start_time}
            row.update({col: r.data.tags.get(tag) for tag, col in TAGS.items()})
            row.update(r.data.metrics)
            rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        raise ReportError(f"no finished trial runs in {', '.join(experiment_names)}")
    df = df.sort_values("start_time").drop_duplicates(["study", "cell"], keep="last")
    df["n_labeled"] = df["n_labeled"].astype(int)
    df["n_train"] = df["n_train"].astype(int)
    df["seed"] = df["seed"].astype(int)
    df["fraction"] = df["n_labeled"] / df["n_train"]
    return df.reset_index(drop=True)


def format_mean_std(mean: float, std: float, n: int) -> str:
    if n == 0 or mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if n == 1 or std is None or math.isnan(std):
        return f"{mean:.2f} (n={n})"
    return f"{mean:.2f} ± {std:.2f} (n={n})"


def _variant_order(variants: Sequence[str]) -> list[str]:
    order = list(VARIANTS)
    return sorted(variants, key=lambda v: (order.index(v) if v in order else len(order), v))


def summarize(df: pd.DataFrame, rows: Sequence[str], cols: Sequence[str], metric: str) -> pd.DataFrame:
    """mean, std (ddof=1) and count over seeds; rows ordered by labeled fraction, not by string."""
    if metric not in df:
        df = df.assign(**{metric: np.nan})
    g = df.groupby([*rows, *cols], dropna=False)[metric].agg(["mean", "std", "count"]).reset_index()
    key = df.groupby(list(rows))["fraction"].first().rename("_fraction").reset_index()
    g = g.merge(key, on=list(rows), how="left").sort_values(["_fraction", *cols]).drop(columns="_fraction")
    return g.reset_index(drop=True)


def _check_protocols(df: pd.DataFrame) -> None:
    for dataset, sub in df.groupby("dataset"):
        protocols = sorted(sub["protocol"].dropna().unique())
        if len(protocols) > 1:
            raise ReportError(
                f"runs of dataset {dataset!r} mix protocols {protocols}: a table must hold one "
                "protocol (report each study separately)"
            )


def study_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One table per metric: rows = split (with #labeled), columns = [backbone /] variant."""
    _check_protocols(df)
    multi_bb = df["backbone"].nunique() > 1
    tables = {}
    for metric in METRICS:
        s = summarize(df, ["split"], ["backbone", "variant"], metric)
        s["cell"] = s.apply(lambda r: format_mean_std(r["mean"], r["std"], int(r["count"])), axis=1)
        s["column"] = (s["backbone"] + " / " + s["variant"]) if multi_bb else s["variant"]
        splits = list(dict.fromkeys(s["split"]))
        labels = df.groupby("split")["n_labeled"].first()
        table = s.pivot(index="split", columns="column", values="cell").reindex(splits)
        cols = [
            f"{b} / {v}" if multi_bb else v
            for b in sorted(df["backbone"].unique())
            for v in _variant_order(df["variant"].unique())
        ]
        table = table.reindex(columns=[c for c in cols if c in table.columns]).fillna("–")
        table.index = [f"{sp} ({labels[sp]})" for sp in table.index]
        table.index.name = "split (labeled)"
        tables[metric] = table
    return tables


def paper_comparison(df: pd.DataFrame, table_id: str) -> pd.DataFrame:
    """Our mean ± std next to the paper's number for every cell of a paper table, and ours − paper."""
    if table_id not in PAPER:
        raise ReportError(f"unknown paper table {table_id!r} (known: {', '.join(PAPER)})")
    rows = []
    for (protocol, split, backbone, variant), paper in PAPER[table_id].items():
        sub = df[
            (df["protocol"] == protocol)
            & (df["split"] == split)
            & (df["backbone"] == backbone)
            & (df["variant"] == variant)
        ]
        vals = sub["final/miou_best"].dropna() if "final/miou_best" in sub else pd.Series(dtype=float)
        mean = float(vals.mean()) if len(vals) else float("nan")
        std = float(vals.std()) if len(vals) > 1 else float("nan")
        rows.append(
            {
                "protocol": protocol,
                "split": split,
                "backbone": backbone,
                "variant": variant,
                "paper": "–" if paper is None else f"{paper:.2f}",
                "ours": format_mean_std(mean, std, len(vals)),
                "ours − paper": "–" if paper is None or not len(vals) else f"{mean - paper:+.2f}",
            }
        )
    return pd.DataFrame(rows)


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def _header(df: pd.DataFrame, study: str) -> list[str]:
    seeds = sorted(df["seed"].unique())
    budget = ""
    if "final/epochs" in df and "final/steps" in df:
        budget = f"; budget: {int(df['final/epochs'].max())} epochs, {int(df['final/steps'].max())} steps per trial"
    return [
        f"# Study `{study}`",
        "",
        f"Dataset **{', '.join(sorted(df['dataset'].unique()))}**, protocol **"
        f"{', '.join(sorted(df['protocol'].unique()))}**, backbone {', '.join(sorted(df['backbone'].unique()))}, "
        f"seeds {', '.join(map(str, seeds))}{budget}. mIoU in %, mean ± std over seeds (n = seeds).",
        "",
    ]


def write_report(df: pd.DataFrame, out_dir: Path, study: str, paper_table: str | None = None) -> list[Path]:
    """results/tables/<study>.{md,csv}, results/plots/<study>_*.png, results/metrics/<study>.json."""
    out_dir = Path(out_dir)
    tables = study_tables(df)
    lines = _header(df, study)
    for metric, table in tables.items():
        lines += [f"## {METRICS[metric]} (`{metric}`)", "", table.to_markdown(), ""]
    written = [_atomic(out_dir / "tables" / f"{study}.md", lambda p: p.write_text("\n".join(lines)))]
    long = pd.concat(
        [summarize(df, ["split", "n_labeled"], ["backbone", "variant"], m).assign(metric=m) for m in METRICS]
    )
    long.insert(0, "protocol", df["protocol"].iloc[0])
    long.insert(0, "dataset", df["dataset"].iloc[0])
    written.append(_atomic(out_dir / "tables" / f"{study}.csv", lambda p: long.to_csv(p, index=False)))
    if paper_table:
        cmp = paper_comparison(df, paper_table)
        text = "\n".join(
            [
                *_header(df, study),
                f"## Ours vs the paper's {paper_table}",
                "",
                cmp.to_markdown(index=False),
                "",
            ]
        )
        written.append(_atomic(out_dir / "tables" / f"{study}_vs_paper.md", lambda p: p.write_text(text)))
        written.append(
            _atomic(out_dir / "tables" / f"{study}_vs_paper.csv", lambda p: cmp.to_csv(p, index=False))
        )
    written += _plots(df, out_dir / "plots", study)
    best = summarize(df, ["split"], ["backbone", "variant"], "final/miou_best")
    metrics = {
        f"{r.split}/{r.backbone}/{r.variant}/miou_best": round(float(r.mean), 4)
        for r in best.itertuples()
        if not math.isnan(r.mean)
    }
    written.append(
        _atomic(
            out_dir / "metrics" / f"{study}.json",
            lambda p: p.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n"),
        )
    )
    return written


def _plots(df: pd.DataFrame, plot_dir: Path, study: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    s = summarize(df, ["split", "n_labeled"], ["backbone", "variant"], "final/miou_best")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for (bb, variant), g in s.groupby(["backbone", "variant"]):
        ax.errorbar(
            g["n_labeled"],
            g["mean"],
            yerr=g["std"].fillna(0),
            marker="o",
            capsize=3,
            label=f"{variant} ({bb})" if s["backbone"].nunique() > 1 else variant,
        )
    ax.set_xscale("log")
    ax.set_xlabel("labeled images")
    ax.set_ylabel("mIoU (%), best epoch")
    ax.set_title(f"{study}: {df['dataset'].iloc[0]} ({df['protocol'].iloc[0]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(_atomic(plot_dir / f"{study}_miou_vs_labels.png", lambda p: fig.savefig(p)))
    plt.close(fig)

    per_class = [c for c in df.columns if str(c).startswith("final/iou_student_last/")]
    if per_class:
        smallest = df.loc[df["fraction"].idxmin(), "split"]
        sub = df[df["split"] == smallest]
        means = sub.groupby("variant")[per_class].mean()
        means = means.reindex(_variant_order(means.index))
        names = [c.split("/", 2)[2] for c in per_class]
        fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4), dpi=110)
        width = 0.8 / max(len(means), 1)
        for i, (variant, row) in enumerate(means.iterrows()):
            ax.bar(np.arange(len(names)) + i * width, row.values, width, label=variant)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("IoU (%), student, last epoch")
        ax.set_title(f"{study}: per-class IoU at {smallest}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        out.append(_atomic(plot_dir / f"{study}_per_class.png", lambda p: fig.savefig(p)))
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Turn MLflow study runs into tables and plots.")
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--study", action="append", required=True)
    p.add_argument("--out", default="results")
    p.add_argument("--paper-table")
    args = p.parse_args(argv)
    try:
        for study in args.study:
            df = load_runs(args.tracking_uri, [f"dssn/{study}"])
            for path in write_report(df, Path(args.out), study, args.paper_table):
                print(path)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
