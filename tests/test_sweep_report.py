"""The sweep's written outputs: an exact tie is reported as a tie, and the grid and best setting
land where dvc.yaml declares them (results/sweep_grid, results/sweep_best)."""

from __future__ import annotations

import json

import pandas as pd

from pipeline.sweep import write_sweep_report


def _trials(values: dict[tuple[float, float], float]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"r": r, "tau_low": t, "seed": 0, "miou": v, "miou_best": v, "epochs": 2, "stopped_early": False}
            for (r, t), v in values.items()
        ]
    )


def test_a_tie_is_reported_as_a_tie(tmp_path):
    out = tmp_path / "results" / "sweeps" / "s"
    df = _trials({(0.9, 0.8): 50.0, (0.9, 0.9): 61.5, (0.96, 0.8): 61.5, (0.96, 0.9): 40.0})
    paths = write_sweep_report(df, out, "s", "grid")
    best = json.loads(paths["best"].read_text())
    assert best["tied"] == 2 and best["miou"] == 61.5
    assert best["tied_settings"] == [{"r": 0.9, "tau_low": 0.9}, {"r": 0.96, "tau_low": 0.8}]
    assert "2-way tie at 61.50" in paths["sensitivity"].read_text()
    tracked = json.loads((tmp_path / "results" / "sweep_best" / "s.json").read_text())
    assert tracked == {"r": 0.9, "tau_low": 0.9, "miou": 61.5, "tied": 2}
    grid = pd.read_csv(tmp_path / "results" / "sweep_grid" / "s.csv")
    assert list(grid.columns) == ["r", "tau_low", "mean", "std", "count"] and len(grid) == 4


def test_a_single_best_is_named(tmp_path):
    paths = write_sweep_report(
        _trials({(0.9, 0.8): 50.0, (0.96, 0.9): 61.0}), tmp_path / "r" / "sw" / "s", "s", "grid"
    )
    assert json.loads(paths["best"].read_text())["tied"] == 1
    assert "Best: r = 0.96, tau_low = 0.9 -> 61.00" in paths["sensitivity"].read_text()
