"""A user's first paper run, in miniature, on the real files of `../shared/fixtures`: `dvc repro`
from extracted VOC + SBD and Cityscapes trees through training (crops from real image sizes, OHEM
on real label maps), whole-image (VOC) and full-resolution sliding-window (Cityscapes) evaluation
and the report. Then the two configurations the driver must refuse in one line before any work.

Sized for CI on 2 CPU cores: ResNet-18 with tiny heads, 1 epoch of 1-2 steps per trial.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from PIL import Image

from pipeline.data.classes import CITYSCAPES, VOC
from pipeline.data.prepare import cityscapes_lut
from tests.conftest import SHARED
from tests.test_e2e_dvc import copy_repo, dvc

FIX = SHARED / "fixtures"
SBD_DEMO = FIX / "sbd" / "benchmark_RELEASE" / "benchmark_code_RELEASE" / "demo" / "datadir"
CS_FRAMES = ("frankfurt_000001_029086", "frankfurt_000001_041517", "frankfurt_000001_055062")
CS_VAL = CS_FRAMES[0]
VOC_VAL = "2007_000042"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not FIX.is_dir(), reason="../shared/fixtures not present")]


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)


def voc_tree(root: Path) -> Path:
    """VOCdevkit/VOC2012 of symlinks to the real JPEGs and SegmentationClassAug labels: 2 VOC train
    ids and 1 val id; the SBD demo's 2 ids join train_aug (4 train images, 1 val)."""
    voc = root / "VOCdevkit" / "VOC2012"
    for jpg in (FIX / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"):
        _link(jpg, voc / "JPEGImages" / jpg.name)
    train = ["2007_000123", "2007_000129"]
    for i in [*train, VOC_VAL]:
        _link(
            FIX / "voc" / "SegmentationClassAug_palette" / f"{i}.png", voc / "SegmentationClass" / f"{i}.png"
        )
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (seg / "val.txt").write_text(f"{VOC_VAL}\n")
    return voc


def cityscapes_tree(root: Path) -> Path:
    """leftImg8bit + gtFine of symlinks to the 3 real 2048x1024 frames: all 3 stand in for train
    (1/4 split: 1 labeled + 2 unlabeled, so the EMA teacher's train-mode first epoch sees 2 images on
    one CPU device) and the first is also the val frame (other paths, so not a train/val overlap)."""
    img = FIX / "cityscapes" / "leftImg8bit" / "val" / "frankfurt"
    gt = FIX / "cityscapes" / "gtFine" / "val" / "frankfurt"
    for split, frames in (("train", CS_FRAMES), ("val", (CS_VAL,))):
        for f in frames:
            _link(
                img / f"{f}_leftImg8bit.png",
                root / "leftImg8bit" / split / "frankfurt" / f"{f}_leftImg8bit.png",
            )
            _link(
                gt / f"{f}_gtFine_labelIds.png",
                root / "gtFine" / split / "frankfurt" / f"{f}_gtFine_labelIds.png",
            )
    return root


def _study(dataset: str, protocol: str, split: str, train: dict, method: dict) -> dict:
    return {
        "dataset": dataset,
        "protocol": protocol,
        "splits": [split],
        "variants": ["dssn"],
        "seeds": [0],
        "overrides": {
            "model": {
                "backbone": "resnet18",
                "deep_stem": False,
                "aspp_channels": 16,
                "skip_channels": 8,
                "decoder_channels": 16,
            },
            "train": {
                "epochs": 1,
                "eval_batch": 1,
                "log_images": 1,
                "threads": 2,
                "progress_every": 1,
                "lr": 0.005,
                **train,
            },
            "method": method,
        },
    }


def _params(work: Path, voc: Path, cs: Path) -> dict:
    raw = yaml.safe_load((work / "params.yaml").read_text())
    raw["datasets"] = {
        "voc": {
            "kind": "voc",
            "num_classes": 21,
            "eval_mode": "whole",
            "source": {"extracted": str(voc), "sbd_extracted": str(SBD_DEMO), "verify_counts": False},
            "protocols": {"blended": {"names": ["1_2"]}},
        },
        "cityscapes": {
            "kind": "cityscapes",
            "num_classes": 19,
            "eval_mode": "sliding",
            "source": {"extracted": str(cs), "verify_counts": False},
            "protocols": {"cityscapes": {"names": ["1_4", "1_2"]}},
        },
    }
    raw["pretrain"], raw["sweeps"] = {}, {}
    raw["ray"].update(num_cpus=2, cpus_per_trial=2)
    raw["studies"] = {
        # VOC: crop 321 of the ~500x375 images (long side rescaled 0.5-2x, padded if smaller), batch 2 + 2, CPLG
        "voc_frames": _study(
            "voc", "blended", "1_2", {"crop": 321, "batch_l": 2, "batch_u": 2, "iters_per_epoch": 1}, {}
        ),
        # Cityscapes as table3: crop 801 of the full frames, OHEM, fixed threshold 0; 1 labeled
        # image per step beside 2 unlabeled ones, sliding-window evaluation at 2048x1024
        "cs_frames": _study(
            "cityscapes",
            "cityscapes",
            "1_4",
            {
                "crop": 801,
                "batch_l": 1,
                "batch_u": 2,
                "iters_per_epoch": 1,
                "sup_loss": "ohem",
                "ohem_min_kept": 100_000,
            },
            {"selection": "fixed", "threshold": 0.0, "intensity_ops": False},
        ),
    }
    return raw


def _valid_pixels_voc() -> int:
    return int(
        (np.array(Image.open(FIX / "voc" / "SegmentationClassAug_palette" / f"{VOC_VAL}.png")) != 255).sum()
    )


def _valid_pixels_cityscapes() -> tuple[int, tuple[int, int]]:
    ids = np.array(
        Image.open(FIX / "cityscapes" / "gtFine" / "val" / "frankfurt" / f"{CS_VAL}_gtFine_labelIds.png")
    )
    return int((cityscapes_lut()[ids] != 255).sum()), ids.shape


def test_real_frames_through_dvc_repro(tmp_path):
    voc = voc_tree(tmp_path / "voc")
    cs = cityscapes_tree(tmp_path / "cityscapes")
    work = copy_repo(tmp_path / "repo")
    params = _params(work, voc, cs)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    t0 = time.time()
    out = dvc(["repro", "train@voc_frames", "train@cs_frames", "report"], work)
    log = out.stdout + out.stderr
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-4000:]
    seconds = time.time() - t0
    print("\n".join(line for line in log.splitlines() if "dssn-s0] " in line or "Running stage" in line))

    # prepared from the real sizes: VOC 500x335 val image, Cityscapes 2048x1024 frames
    voc_val = (work / "data/splits/voc/blended/val.txt").read_text().split()
    assert Image.open(work / "data/prepared/voc" / voc_val[1]).size == (500, 335)
    cs_val = (work / "data/splits/cityscapes/cityscapes/val.txt").read_text().split()
    assert Image.open(work / "data/prepared/cityscapes" / cs_val[1]).size == (2048, 1024)

    # progress from inside each trial: the plan, every step with s/step and loss, the evaluation
    assert "[1_4-resnet18-dssn-s0] 1 epoch(s) x 1 steps on cpu, batch 1 + 2 per worker, crop 801" in log
    assert "[1_4-resnet18-dssn-s0] step 1/1 (epoch 1/1)" in log and " s/step ETA 0:00:00 loss " in log
    assert "[1_4-resnet18-dssn-s0] epoch 1: teacher mIoU" in log and "(sliding)" in log
    assert "[1_2-resnet18-dssn-s0] step 1/1 (epoch 1/1)" in log

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    n_valid_cs, shape = _valid_pixels_cityscapes()
    assert shape == (1024, 2048)
    for study, names, n_valid in (
        ("voc_frames", VOC, _valid_pixels_voc()),
        ("cs_frames", CITYSCAPES, n_valid_cs),
    ):
        (result,) = (work / "results/runs" / study).glob("*.json")
        summary = json.loads(result.read_text())
        for key in ("final/miou_best", "final/miou_student_last", "final/miou_teacher_last"):
            assert 0.0 <= summary[key] <= 100.0, (study, key, summary[key])
        assert summary["final/steps"] == 1
        run = summary["mlflow_run_id"]
        # evaluated on the val image's full label map: every non-ignore pixel counted once
        conf_file = download_artifacts(
            run_id=run, artifact_path="eval/confusion.json", dst_path=str(tmp_path / study), tracking_uri=uri
        )
        conf = json.loads(Path(conf_file).read_text())
        assert conf["classes"] == names
        assert int(np.array(conf["matrix"]).sum()) == n_valid, study
        metrics = client.get_run(run).data.metrics
        assert {f"val_class_student/{n}" for n in names} <= set(metrics)
        table = (work / "results/tables" / f"{study}.md").read_text()
        assert "Per-class IoU" in table
        header = next(line for line in table.splitlines() if "Per-class" not in line and names[-1] in line)
        assert all(f" {n} " in header for n in names), header  # the real class names, in order

    # pseudo-label statistics: threshold 0 keeps every valid pixel the teacher predicts
    cs_run = json.loads(next((work / "results/runs/cs_frames").glob("*.json")).read_text())["mlflow_run_id"]
    metrics = client.get_run(cs_run).data.metrics
    kept = [v for k, v in metrics.items() if k.startswith("pseudo_kept/") and not np.isnan(v)]
    assert kept and all(k == pytest.approx(1.0) for k in kept)
    assert 0.0 <= metrics["train/pl_accuracy"] <= 1.0
    cs_table = (work / "results/tables/cs_frames.md").read_text()
    assert "## Pseudo-labels of the" in cs_table and "accuracy of kept" in cs_table
    assert (work / "results/metrics.json").exists()
    print(f"dvc repro on the real frames: {seconds:.0f} s")

    # The Cityscapes configurations, refused in one line before any work (no Ray, no run):
    # batch 2 + 2 on the 1/2 split's single unlabeled frame (used to hang at 100 % CPU), and
    # 1 + 1 on one device (used to die in the teacher's ASPP pooling BatchNorm inside Ray).
    n_runs = len(client.search_runs([client.get_experiment_by_name("dssn/cs_frames").experiment_id]))
    bad = {
        "cs_no_batch": (
            "1_2",
            {"batch_l": 2, "batch_u": 2},
            "unlabeled.txt (1 items) with train.batch_u 2 on 1 worker",
        ),
        "cs_batch_one": (
            "1_4",
            {"batch_l": 1, "batch_u": 1},
            "train.batch_u 1 over 1 worker puts 1 image per device",
        ),
    }
    for name, (split, batch, why) in bad.items():
        study = _study("cityscapes", "cityscapes", split, {"crop": 801, "iters_per_epoch": 1, **batch}, {})
        params["studies"][name] = study
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        t0 = time.time()
        refused = dvc(["repro", f"train@{name}"], work)
        assert refused.returncode != 0 and time.time() - t0 < 90
        errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and why in errors[0], refused.stderr[-3000:]
        assert "Traceback" not in refused.stdout + refused.stderr
        assert not (work / "results/runs" / name).exists()
        assert client.get_experiment_by_name(f"dssn/{name}") is None
        del params["studies"][name]
    assert len(client.search_runs([client.get_experiment_by_name("dssn/cs_frames").experiment_id])) == n_runs
