"""fetch -> prepare -> splits through the real `dvc repro`, on archives in the real formats served from
127.0.0.1: a VOCdevkit tar, an SBD tgz with scipy-written .mat files, and Cityscapes zips behind a login."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from pipeline.data.splits import read_list
from tests.data.builders import cityscapes_zips, tar_of, voc_tree
from tests.data.server import PASSWORD, USER, Handler, LocalServer
from tests.test_e2e_dvc import REPO, copy_repo, dvc

pytestmark = pytest.mark.slow


def md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_real_format_datasets_through_dvc(tmp_path, monkeypatch):
    voc_tree(tmp_path / "src", train=tuple(f"2007_{i:06d}" for i in range(1, 9)), val=("2007_000100", "2007_000101"),
             sbd_only=tuple(f"2008_{i:06d}" for i in range(1, 9)))
    voc_tar = tar_of(tmp_path / "src" / "VOCdevkit", tmp_path / "VOCtrainval_11-May-2012.tar", "VOCdevkit")
    sbd_tgz = tar_of(tmp_path / "src" / "benchmark_RELEASE", tmp_path / "benchmark.tgz", "benchmark_RELEASE")
    gt, left = cityscapes_zips(tmp_path / "cs", cities=(("train", "aachen", 16), ("val", "frankfurt", 2)))

    work = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((work / "params.yaml").read_text())
    with LocalServer() as srv:
        Handler.packages = {1: (gt.name, gt.read_bytes()), 3: (left.name, left.read_bytes())}
        params["datasets"] = {
            "voc": {"kind": "voc", "num_classes": 21,
                    "source": {"url": srv.add("/voc.tar", voc_tar), "md5": md5(voc_tar),
                               "sbd_url": srv.add("/benchmark.tgz", sbd_tgz), "sbd_md5": md5(sbd_tgz),
                               "verify_counts": False},
                    "protocols": {"classic": {"names": ["2", "8"]}, "blended": {"names": ["1_4", "1_2"]}}},
            "cityscapes": {"kind": "cityscapes", "num_classes": 19, "eval_mode": "sliding",
                           "source": {"url": srv.url, "verify_counts": False},
                           "protocols": {"cityscapes": {"names": ["1_8", "1_2"]}}},
        }
        params["studies"], params["sweeps"] = {}, {}
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        monkeypatch.setenv("CITYSCAPES_USERNAME", USER)
        monkeypatch.setenv("CITYSCAPES_PASSWORD", PASSWORD)
        # the Cityscapes md5s of the fake server's packages come from its md5-sum endpoint
        out = dvc(["repro", "splits@voc", "splits@cityscapes"], work)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert PASSWORD not in out.stdout + out.stderr

    voc = work / "data" / "prepared" / "voc"
    assert len(read_list(voc / "lists" / "train.txt")) == 16  # 8 VOC train + 8 SBD-only
    blended = json.loads((work / "data/splits/voc/blended/1_4/split.json").read_text())
    assert (blended["protocol"], blended["n_labeled"], blended["n_unlabeled"]) == ("blended", 4, 12)
    classic = read_list(work / "data/splits/voc/classic/2/labeled.txt")
    assert len(classic) == 2 and all(line.startswith("JPEGImages/2007_") for line in classic)
    cs = json.loads((work / "data/splits/cityscapes/cityscapes/1_8/split.json").read_text())
    assert (cs["n_labeled"], cs["n_unlabeled"]) == (2, 14)
    assert len(read_list(work / "data/splits/cityscapes/cityscapes/val.txt")) == 2

    # A second run changes nothing; a broken archive fails clearly and keeps what exists.
    again = dvc(["status", "splits@voc", "splits@cityscapes"], work)
    assert "changed" not in again.stdout
    params["datasets"]["voc"]["source"]["md5"] = "0" * 32
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with LocalServer() as srv2:
        params["datasets"]["voc"]["source"]["url"] = srv2.add("/voc.tar", voc_tar)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        bad = dvc(["repro", "fetch@voc"], work)
    assert bad.returncode != 0
    assert "checksum" in (bad.stdout + bad.stderr).lower()
    assert (voc / "lists" / "train.txt").exists()
    assert REPO.exists()
