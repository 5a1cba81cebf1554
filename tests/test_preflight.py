"""Configurations that cannot train are refused before any work: loaders that would yield no batch
(a list, or a worker's shard of it, smaller than its batch) and one image per device in a train-mode
BatchNorm forward. Before, the first hung a trial at 100 % CPU and the second died inside Ray."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params, method_for_variant
from pipeline.orchestrate import study_specs
from pipeline.train import PlanError, check_plan, fit
from tests.conftest import REPO
from tests.test_e2e_dvc import tiny_params
from tests.test_orchestrate import _env, _prepare


def _spec(tmp_path: Path, n_lab: int, n_unl: int, variant: str = "dssn", **train):
    """The demo's dssn cell over split lists of the given sizes (check_plan only reads the lists)."""
    base = next(
        s for s in study_specs(load_params(REPO / "params.yaml"), "demo", REPO) if s.variant == "dssn"
    )
    split = tmp_path / "splits" / "s"
    split.mkdir(parents=True, exist_ok=True)
    (split / "labeled.txt").write_text("".join(f"l{i}.jpg l{i}.png\n" for i in range(n_lab)))
    (split / "unlabeled.txt").write_text("".join(f"u{i}.jpg u{i}.png\n" for i in range(n_unl)))
    return dataclasses.replace(
        base,
        split_dir=str(tmp_path / "splits"),
        split="s",
        variant=variant,
        method=method_for_variant(base.method, variant),
        train=dataclasses.replace(base.train, **{"iters_per_epoch": None, **train}),
    )


def test_a_list_smaller_than_its_batch_is_refused_naming_list_size_batch_workers(tmp_path):
    with pytest.raises(
        PlanError, match=r"unlabeled.txt \(1 items\) with train.batch_u 2 on 1 worker, so its loader"
    ):
        check_plan(_spec(tmp_path, 1, 1, batch_l=2, batch_u=2))
    # the labeled list is repeated to the unlabeled list's length: 1 labeled image feeds batch 2
    check_plan(_spec(tmp_path, 1, 4, batch_l=2, batch_u=2))
    with pytest.raises(PlanError, match=r"labeled.txt \(1 items, repeated to 3\) with train.batch_l 4"):
        check_plan(_spec(tmp_path, 1, 3, batch_l=4, batch_u=2, iters_per_epoch=2))
    with pytest.raises(PlanError, match=r"labeled.txt \(2 items\) with train.batch_l 4 on 1 worker"):
        check_plan(_spec(tmp_path, 2, 8, "supervised_ref", batch_l=4, batch_u=4))


def test_a_worker_shard_smaller_than_its_batch_is_refused(tmp_path):
    # DistributedSampler: each of 2 workers gets ceil(3 / 2) = 2 items; batch 8 = 4 per worker
    with pytest.raises(
        PlanError,
        match=r"\(3 items\) with train.batch_u 8 over 2 workers: each worker's shard holds 2, fewer than its 4",
    ):
        check_plan(_spec(tmp_path, 8, 3, batch_l=8, batch_u=8, iters_per_epoch=2), world=2)
    # 2 per worker fits a shard of 2 (the sampler pads): with a fixed epoch length this trains ...
    check_plan(_spec(tmp_path, 4, 3, batch_l=4, batch_u=4, iters_per_epoch=2), world=2)
    # ... and without one an epoch (3 // 4 steps) would have none
    with pytest.raises(
        PlanError, match=r"an epoch would have no step: .*unlabeled.txt \(3 items\) with train.batch_u 4"
    ):
        check_plan(_spec(tmp_path, 4, 3, batch_l=4, batch_u=4), world=2)
    with pytest.raises(PlanError, match="must be divisible by the 2 workers"):
        check_plan(_spec(tmp_path, 4, 4, batch_l=3, batch_u=4), world=2)


def test_one_image_per_device_in_a_train_mode_forward_alone_is_refused_unless_syncbn(tmp_path):
    teacher = r"train.batch_u 1 over 1 worker puts 1 image per device into the EMA teacher"
    with pytest.raises(PlanError, match=teacher):
        check_plan(_spec(tmp_path, 2, 2, batch_l=1, batch_u=1))
    with pytest.raises(
        PlanError, match=r"train.batch_l 1 over 1 worker puts 1 image per device into the student"
    ):
        check_plan(_spec(tmp_path, 2, 2, "supervised", batch_l=1, batch_u=1))
    # the semi-supervised student sees labeled + unlabeled together: 1 labeled image is fine
    check_plan(_spec(tmp_path, 2, 2, batch_l=1, batch_u=2))
    # UniMatch has no EMA teacher (the student predicts in eval mode): 1 + 1 works on one device
    check_plan(_spec(tmp_path, 2, 2, "unimatch", batch_l=1, batch_u=1))
    # 1 + 1 per device over 2 workers: SyncBatchNorm on CUDA normalises over both; CPU (gloo) cannot
    two = _spec(tmp_path, 4, 4, batch_l=2, batch_u=2)
    check_plan(two, world=2, sync_bn=True)
    check_plan(two, world=2, sync_bn=None)  # the driver before Ray, GPUs not known yet
    with pytest.raises(
        PlanError, match=r"over 2 workers puts 1 image per device .*CPU \(gloo\) have no SyncBatchNorm"
    ):
        check_plan(two, world=2, sync_bn=False)


@pytest.fixture(scope="module")
def one_plus_one(tmp_path_factory):
    """A prepared dataset whose 1/2 split is cut to 1 labeled + 1 unlabeled image, as the issue's
    Cityscapes run (2 train frames, split 1/2)."""
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["datasets"]["synthetic"]["source"]["synthetic"].update(n_train=16, n_val=1)
    params["datasets"]["synthetic"]["protocols"]["blended"]["names"] = ["1_2"]
    params["studies"]["demo"].update(splits=["1_2"], variants=["dssn"])
    params["sweeps"] = {}
    root = _prepare(tmp_path_factory.mktemp("one_plus_one"), params)
    split = root / "data/splits/synthetic/blended/1_2"
    for name in ("labeled.txt", "unlabeled.txt"):
        (split / name).write_text((split / name).read_text().splitlines()[0] + "\n")
    return root, params


def _train_cli(root: Path, params: dict, **train) -> tuple[subprocess.CompletedProcess, float]:
    params = {**params, "studies": {"demo": {**params["studies"]["demo"]}}}
    params["studies"]["demo"]["overrides"] = {
        **params["studies"]["demo"]["overrides"],
        "train": {**params["studies"]["demo"]["overrides"]["train"], **train},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "train", "demo"],
        cwd=root,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=240,  # the old code: a busy loop forever, or Ray retrying a BatchNorm traceback
    )
    return out, time.time() - t0


def _refused_before_any_work(root: Path, out: subprocess.CompletedProcess, seconds: float) -> str:
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 1_2-resnet18-dssn-s0: "), out.stderr[-3000:]
    assert seconds < 60
    for untouched in ("mlflow.db", "ray_results", "mlartifacts", "results/runs"):
        assert not (root / untouched).exists(), untouched
    return lines[0]


def test_cli_refuses_a_loader_without_a_batch_in_seconds(one_plus_one):
    """Batch 2 + 2 on 1 unlabeled image: the trial used to spin forever at 100 % CPU."""
    root, params = one_plus_one
    out, seconds = _train_cli(root, params, batch_l=2, batch_u=2, iters_per_epoch=2)
    line = _refused_before_any_work(root, out, seconds)
    assert "unlabeled.txt (1 items) with train.batch_u 2 on 1 worker" in line and "yield no batch" in line


def test_cli_refuses_one_image_per_device_in_seconds(one_plus_one):
    """Batch 1 + 1 on one device: the teacher's train-mode forward used to die inside Ray, retried."""
    root, params = one_plus_one
    out, seconds = _train_cli(root, params, batch_l=1, batch_u=1, iters_per_epoch=2)
    line = _refused_before_any_work(root, out, seconds)
    assert "train.batch_u 1 over 1 worker puts 1 image per device into the EMA teacher" in line


def _tiny_dssn_spec(tmp_path):
    """The tiny demo's 1_4 dssn cell on a freshly prepared embedded dataset."""
    params = tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["sweeps"] = {}
    root = _prepare(tmp_path, params)
    return next(
        s
        for s in study_specs(load_params(root / "params.yaml"), "demo", root)
        if s.split == "1_4" and s.variant == "dssn"
    )


@pytest.mark.parametrize("variant,batch", [("dssn", (1, 2)), ("unimatch", (1, 1))])
def test_batch_one_trains_where_it_can_on_one_device(variant, batch, tmp_path):
    """What the check lets through really trains: 1 labeled image beside 2 unlabeled (the student
    sees 3), and UniMatch at 1 + 1 (no EMA teacher in train mode)."""
    spec = _tiny_dssn_spec(tmp_path)
    spec = dataclasses.replace(
        spec,
        variant=variant,
        method=method_for_variant(spec.method, variant),
        train=dataclasses.replace(
            spec.train, epochs=1, iters_per_epoch=2, batch_l=batch[0], batch_u=batch[1]
        ),
    )
    check_plan(spec)
    summary = fit(spec)
    assert summary["final/steps"] == 2 and 0 <= summary["final/miou_best"] <= 100


def test_what_the_check_refuses_is_what_batch_norm_would_do(tmp_path, monkeypatch):
    """Without the check, 1 + 1 on one device dies in the teacher's train-mode ASPP pooling BN,
    the traceback the issue saw inside Ray."""
    import pipeline.train

    spec = _tiny_dssn_spec(tmp_path)
    spec = dataclasses.replace(
        spec, train=dataclasses.replace(spec.train, epochs=1, iters_per_epoch=1, batch_l=1, batch_u=1)
    )
    with pytest.raises(PlanError):
        check_plan(spec)
    monkeypatch.setattr(pipeline.train, "check_plan", lambda *a, **k: None)
    with pytest.raises(
        ValueError,
        match=r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 16, 1, 1\]\)",
    ):
        fit(spec)
