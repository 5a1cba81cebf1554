"""Shared test fixtures: environment hygiene for MLflow, Ray and DVC, and small configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(autouse=True)
def _no_leaking_mlflow_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(1)
    yield


class SecondDevice:
    """Where a "second device" test runs: CUDA, or the CPU fast path (`train.fast_path_on_cpu`):
    4-D tensors in channels-last memory format and the code under bf16 autocast, as the fast path
    gives them to the eager part of the step. So these tests run on every CPU, not only on a GPU."""

    def __init__(self, kind: str):
        import torch

        self.kind = kind
        self.device = torch.device("cuda" if kind == "cuda" else "cpu")

    def to(self, t):
        """`t` on this device (channels-last if 4-D on the CPU fast path)."""
        import torch

        t = t.to(self.device)
        if self.kind == "cpu-fast" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def module(self, m):
        """Module `m` on this device (channels-last on the CPU fast path, as the Trainer puts it)."""
        import torch

        m = m.to(self.device)
        return m.to(memory_format=torch.channels_last) if self.kind == "cpu-fast" else m

    def autocast(self):
        import contextlib

        import torch

        if self.kind == "cpu-fast":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _second_devices() -> list:
    import torch

    return [
        pytest.param("cpu-fast", id="cpu-fast"),
        pytest.param(
            "cuda",
            id="cuda",
            marks=[
                pytest.mark.gpu,
                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
            ],
        ),
    ]


@pytest.fixture(params=_second_devices())
def second(request) -> SecondDevice:
    """The fast path's "other device": the CPU fast path always, CUDA where there is one (marked gpu)."""
    return SecondDevice(request.param)
