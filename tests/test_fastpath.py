"""The fast path's switches on CPU: compile fallback, optimizer choice, and the benchmark harness."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pipeline.config import ConfigError, DatasetCfg, MethodCfg, ModelCfg, TrainCfg, build
from pipeline.orchestrate import applied_config
from pipeline.train import Trainer, TrialSpec
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
    tr.step_model, tr.step_teacher, tr.compiled = _Broken(tr.student), _Broken(tr.teacher), True
    before = [p.detach().clone() for p in tr.student.parameters()]
    loss, _ = tr.step(batch(), torch.Generator().manual_seed(0), 1, 10)
    assert torch.isfinite(loss) and not tr.compiled and tr.step_model is tr.student
    assert tr.step_teacher is tr.teacher  # both compiled regions fall back
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


def test_fast_path_on_cpu_is_a_validated_switch():
    assert build(TrainCfg, {"fast_path_on_cpu": True}, "train").fast_path_on_cpu is True
    assert TrainCfg().fast_path_on_cpu is False  # a CPU run stays fp32 eager unless asked
    with pytest.raises(ConfigError, match="train.fast_path_on_cpu` must be true or false"):
        build(TrainCfg, {"fast_path_on_cpu": "yes"}, "train")


def test_fast_path_on_cpu_applies_every_switch_without_compiling_yet():
    cfg = TrainCfg(crop=32, fast_path_on_cpu=True)
    tr = Trainer(MODEL, cfg, MethodCfg(), 4, torch.device("cpu"))
    assert tr.autocast and tr.compiled
    # compiled region: student and teacher, each its own torch.compile of the eager module
    assert tr.step_model._orig_mod is tr.student and tr.step_teacher._orig_mod is tr.teacher
    for m in (tr.student, tr.teacher):
        assert m.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    eager = Trainer(
        MODEL, TrainCfg(crop=32, fast_path_on_cpu=True, compile=False), MethodCfg(), 4, torch.device("cpu")
    )
    assert eager.autocast and not eager.compiled and eager.step_teacher is eager.teacher


def _spec(train: TrainCfg) -> TrialSpec:
    return TrialSpec(
        study="s",
        cell="c",
        dataset_name="d",
        dataset=DatasetCfg(kind="voc", num_classes=4),
        class_names=["a", "b", "c", "d"],
        root="/nonexistent",
        split_dir="/nonexistent",
        split="1_4",
        protocol="blended",
        variant="dssn",
        seed=0,
        model=MODEL,
        train=train,
        method=MethodCfg(),
    )


def test_applied_config_reports_the_forced_cpu_fast_path():
    on = applied_config(_spec(TrainCfg(fast_path_on_cpu=True)), torch.device("cpu"))["train"]
    off = applied_config(_spec(TrainCfg()), torch.device("cpu"))["train"]
    assert (on["amp"], on["channels_last"], on["compile"]) == (True, True, True)
    assert (off["amp"], off["channels_last"], off["compile"]) == (False, False, False)


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
