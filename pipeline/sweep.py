"""Sweeps over CPLG's r x tau_low: a full-budget grid for tables, or an ASHA/Optuna exploration.

Both run through the same Ray runner as the studies (`orchestrate.run_cells`), so a sweep trial
is an ordinary trial: checkpointed, resumable, one MLflow child run under the sweep's parent.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Params, SweepCfg, merge, method_for_variant, to_dict
from pipeline.io import atomic, write_text
from pipeline.orchestrate import run_cells, study_paths, study_specs
from pipeline.train import TrialSpec

METRIC = "val/miou_student"


def sweep_specs(params: Params, name: str, root: Path) -> list[TrialSpec]:
    """Base cells of the sweep (one per seed); grid mode expands them over r x tau_low."""
    sw = params.sweeps[name]
    template = next(s for s in study_specs(params, sw.study, root) if s.split == sw.split)
    _, _, base = params.studies[sw.study].cell_sections(
        params, template.model.backbone, f"studies.{sw.study}"
    )
    method = method_for_variant(
        merge(base, sw.overrides.method, f"sweeps.{name}.overrides.method"), sw.variant
    )
    template = dataclasses.replace(
        template,
        model=merge(template.model, sw.overrides.model, f"sweeps.{name}.overrides.model"),
        train=merge(template.train, sw.overrides.train, f"sweeps.{name}.overrides.train"),
    )
    out = []
    for seed in sw.seeds:
        s = dataclasses.replace(
            template,
            study=f"sweep-{name}",
            variant=sw.variant,
            seed=seed,
            method=method,
            cell=f"{sw.split}-{template.model.backbone}-{sw.variant}-s{seed}",
        )
        if sw.mode == "explore":
            out.append(s)
            continue
        for r in sw.r:
            for tau in sw.tau_low:
                out.append(
                    dataclasses.replace(
                        s,
                        cell=f"{s.cell}-r{r:.4f}-t{tau:.4f}",
                        method=merge(s.method, {"r": r, "tau_low": tau}, f"sweeps.{name}"),
                    )
                )
    return out


def _search(sw: SweepCfg, epochs: int) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = {
        "r": tune.uniform(min(sw.r), max(sw.r)),
        "tau_low": tune.uniform(min(sw.tau_low), max(sw.tau_low)),
    }
    search_alg = None
    if sw.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=0)
    # Time is the trial's epoch, not Tune's report count: a finished trial reports once more (its
    # result), and survivors end on their own (max_t beyond the last epoch) instead of being stopped.
    scheduler = ASHAScheduler(
        time_attr="epoch",
        max_t=epochs + 1,
        grace_period=sw.grace_period,
        reduction_factor=sw.reduction_factor,
    )
    return {
        "space": space,
        "num_samples": sw.num_samples,
        "scheduler": scheduler,
        "search_alg": search_alg,
        "max_concurrent": sw.max_concurrent,
        "metric": METRIC,
        "mode": "max",
        "id": to_dict(sw),  # a stable key for the Ray experiment's name (schedulers have no stable repr)
    }


def run_sweep(params: Params, name: str, root: Path) -> dict[str, Path]:
    """Run (or resume) sweep `name`; writes trials.csv, best.json, sensitivity.md and heatmap.png."""
    sw = params.sweeps[name]
    specs = sweep_specs(params, name, root)
    out_dir = study_paths(params, root).results / "sweeps" / name
    search = None
    if sw.mode == "explore":
        search = _search(sw, specs[0].train.epochs)
        specs = specs[:1]
    res = run_cells(params, root, f"sweep-{name}", specs, out_dir / "runs", search=search)
    if sw.mode == "grid":
        rows = [
            {
                "r": s["method.r"],
                "tau_low": s["method.tau_low"],
                "seed": s["seed"],
                "miou": s.get("final/miou_student_best"),
                "miou_best": s.get("final/miou_best"),
                "epochs": s.get("final/epochs"),
                "stopped_early": False,
            }
            for s in res["summaries"]
        ]
    else:
        rows = []
        for r in res["results"]:
            hist = r.metrics_dataframe
            best = float(hist[METRIC].max()) if hist is not None and METRIC in hist else float("nan")
            rows.append(
                {
                    "r": r.config["r"],
                    "tau_low": r.config["tau_low"],
                    "seed": 0,
                    "miou": best,
                    "miou_best": best,
                    "epochs": r.metrics.get("epoch"),
                    "stopped_early": r.metrics.get("epoch", 0) < specs[0].train.epochs,
                }
            )
    return write_sweep_report(pd.DataFrame(rows), out_dir, name, sw.mode)


def write_sweep_report(df: pd.DataFrame, out_dir: Path, name: str, mode: str) -> dict[str, Path]:
    """The sweep's trials table, its best setting (or tie), the sensitivity table and a heatmap, plus
    `<results>/sweep_grid/<name>.csv` and `<results>/sweep_best/<name>.json` for `dvc plots`/`metrics`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    df = df.sort_values(["r", "tau_low", "seed"]).reset_index(drop=True)
    paths = {
        "trials": out_dir / "trials.csv",
        "best": out_dir / "best.json",
        "sensitivity": out_dir / "sensitivity.md",
        "heatmap": out_dir / "heatmap.png",
    }
    write_text(paths["trials"], df.to_csv(index=False))
    full = df[~df["stopped_early"]] if mode == "explore" else df
    full = full if len(full) else df
    mean = full.groupby(["r", "tau_low"])["miou"].agg(["mean", "std", "count"]).reset_index()
    best = mean.loc[mean["mean"].idxmax()]
    tied = mean[mean["mean"] == best["mean"]]  # exact ties are reported as ties, not as one winner
    best_info = {
        "r": float(best["r"]),
        "tau_low": float(best["tau_low"]),
        "miou": float(best["mean"]),
        "seeds": int(best["count"]),
        "tied": len(tied),
        "mode": mode,
        "metric": f"best-epoch {METRIC}",
    }
    if len(tied) > 1:
        best_info["tied_settings"] = [
            {"r": float(r), "tau_low": float(t)} for r, t in zip(tied["r"], tied["tau_low"], strict=True)
        ]
    write_text(paths["best"], json.dumps(best_info, indent=2) + "\n")
    # DVC-tracked copies (dvc.yaml: `dvc plots` draws the grid, `dvc metrics`/`exp show` compare the best)
    tracked = out_dir.parent.parent
    write_text(tracked / "sweep_grid" / f"{name}.csv", mean.to_csv(index=False, float_format="%.4f"))
    write_text(
        tracked / "sweep_best" / f"{name}.json",
        json.dumps({k: v for k, v in best_info.items() if k in ("r", "tau_low", "miou", "tied")}, indent=2)
        + "\n",
    )
    grid = mean.pivot(index="r", columns="tau_low", values="mean")
    lines = [
        f"# Sweep `{name}` ({mode}): best-epoch student mIoU (%), mean over seeds",
        "",
        (
            f"Best: r = {best['r']:g}, tau_low = {best['tau_low']:g} -> {best['mean']:.2f}"
            if len(tied) == 1
            else f"Best: a {len(tied)}-way tie at {best['mean']:.2f} ("
            + ", ".join(
                f"r = {r:g}, tau_low = {t:g}" for r, t in zip(tied["r"], tied["tau_low"], strict=True)
            )
            + ")"
        ),
        "",
        f"Sensitivity: spread over the grid {np.nanmax(grid.values) - np.nanmin(grid.values):.2f} points; "
        f"over r (mean per r) {_spread(mean, 'r'):.2f}; over tau_low {_spread(mean, 'tau_low'):.2f}",
        "",
        grid.rename(columns=lambda c: f"tau_low={c:g}", index=lambda i: f"r={i:g}").to_markdown(
            floatfmt=".2f"
        ),
    ]
    write_text(paths["sensitivity"], "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(1.2 * len(grid.columns) + 2, 1.0 * len(grid.index) + 1.5), dpi=100)
    im = ax.imshow(grid.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(grid.columns)), [f"{c:g}" for c in grid.columns])
    ax.set_yticks(range(len(grid.index)), [f"{i:g}" for i in grid.index])
    ax.set_xlabel("tau_low")
    ax.set_ylabel("r")
    for (i, j), v in np.ndenumerate(grid.values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="mIoU (%)")
    ax.set_title(f"sweep {name}")
    fig.tight_layout()
    atomic(paths["heatmap"], fig.savefig)
    plt.close(fig)
    return paths


def _spread(mean: pd.DataFrame, axis: str) -> float:
    m = mean.groupby(axis)["mean"].mean()
    return float(m.max() - m.min()) if len(m) else float("nan")
