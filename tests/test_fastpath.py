"""The fast path's switches on CPU: compile fallback, optimizer choice, and the benchmark harness."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.config import MethodCfg, ModelCfg, TrainCfg
from pipeline.train import Trainer
from tests.conftest import REPO
from tests.test_step import MODEL, batch


class _Broken(torch.nn.Module):
    """Stands in for a compiled module whose compilation fails on first call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *a, **k):
        raise RuntimeError("inductor: no C++ compiler")


def test_compile_failure_falls_back_to_eager_and_trains(capsys):
    torch.manual_seed(0)
    tr = Trainer(MODEL, TrainCfg(crop=32, lr=0.01), MethodCfg(), 4, torch.device("cpu"))
    tr.step_model, tr.compiled = _Broken(tr.student), True
    before = [p.detach().clone() for p in tr.student.parameters()]
    loss, _ = tr.step(batch(), torch.Generator().manual_seed(0), 1, 10)
    assert torch.isfinite(loss) and not tr.compiled and tr.step_model is tr.student
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.student.parameters(), strict=True))
    assert "falling back to eager" in capsys.readouterr().out


def test_errors_of_the_eager_path_are_not_swallowed():
    tr = Trainer(MODEL, TrainCfg(crop=32), MethodCfg(), 4, torch.device("cpu"))
    tr.step_model = _Broken(tr.student)  # not compiled: a real error must surface
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        tr.step(batch(), torch.Generator().manual_seed(0), 1, 10)


def test_cpu_ignores_gpu_only_switches_and_uses_foreach():
    tr = Trainer(
        MODEL,
        TrainCfg(crop=32, amp=True, channels_last=True, compile=True),
        MethodCfg(),
        4,
        torch.device("cpu"),
    )
    assert not tr.autocast and not tr.compiled
    assert tr.opt.defaults.get("foreach") is True
    w = tr.student.backbone.conv1.weight
    assert w.is_contiguous()  # not channels-last on CPU


def test_adamw_option():
    tr = Trainer(
        ModelCfg(**{**MODEL.__dict__}),
        TrainCfg(crop=32, optimizer="adamw", lr=1e-3),
        MethodCfg(),
        4,
        torch.device("cpu"),
    )
    assert isinstance(tr.opt, torch.optim.AdamW)
    assert [g["lr"] for g in tr.opt.param_groups] == [1e-3, 1e-2]  # head x10


@pytest.mark.slow
def test_benchmark_harness_runs_and_writes_json(tmp_path):
    out = tmp_path / "step.json"
    res = subprocess.run(
        [sys.executable, "bench/step.py", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    modes = {r["mode"]: r for r in data["steps"]}
    assert set(modes) == {"fp32-eager", "fast"}
    assert modes["fp32-eager"]["flops_per_step"] > 0 and modes["fp32-eager"]["images_per_s"] > 0
    assert data["loader"]["samples_per_s"] > 0
    assert "fp32-eager" in res.stdout and "data pipeline" in res.stdout
