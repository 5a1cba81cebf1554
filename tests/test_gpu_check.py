"""`make gpu-check`'s script runs end to end on a CPU (`--cpu-smoke`) before anyone spends GPU time."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_one_json_summary(tmp_path):
    out = tmp_path / "gpu_check.json"
    res = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert json.loads(res.stdout) == data  # stdout is the summary alone
    assert data["ok"] and data["mode"] == "cpu-smoke"
    assert data["info"]["torch"] and data["info"]["gpus"] == 0
    # the @gpu tests were collected (their CUDA variants skip on a CPU), none failed
    assert data["gpu_tests"]["tests"] >= 5 and not data["gpu_tests"]["failures"] + data["gpu_tests"]["errors"]
    modes = {r["mode"]: r for r in data["bench"]["steps"]}
    assert set(modes) == {"fp32-eager", "fast"} and modes["fp32-eager"]["tflops"] > 0
    assert data["bench"]["loader"]["samples_per_s"] > 0
    fit = data["fit"]
    assert fit["fast"]["amp"] and fit["fast"]["steps"] == fit["fp32"]["steps"] == fit["steps_planned"] == 4
    assert math.isfinite(fit["loss_max_rel_diff"]) and fit["loss_agree"]
    assert "two GPUs" in data["ddp"]["skipped"]
