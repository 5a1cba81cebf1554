"""configs/paper.yaml's split protocols through the real `dvc repro`, on datasets holding exactly the ids of
the published lists: every split the paper reports must come out identical to the published one.

VOC tar + SBD tgz + Cityscapes zips in the real formats (tiny images) and UniMatch's split files (read in
place from ../shared/splits) are served from 127.0.0.1; only the dataset sources and the split URL
differ from paper.yaml.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import yaml

from pipeline.data import published as pub
from pipeline.data.splits import read_list
from tests.conftest import SHARED
from tests.data.builders import cityscapes_zips, tar_of, voc_sbd_release
from tests.data.server import PASSWORD, USER, Handler, LocalServer
from tests.test_e2e_dvc import copy_repo, dvc

UNIMATCH = SHARED / "splits" / "LiheYoung_UniMatch" / "splits"
CPS_VOC = SHARED / "splits" / "charlesCXK_TorchSemiSeg" / "DATA" / "pascal_voc" / "subset_train_aug"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not UNIMATCH.is_dir() or not CPS_VOC.is_dir(), reason="../shared/splits absent"),
]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def voc_id(line: str) -> str:
    return line.split()[0].removeprefix("JPEGImages/").removesuffix(".jpg")


def city_frame(line: str) -> tuple[str, str, str]:
    """`leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png ...` -> (split, city, stem)."""
    _, split, city, name = line.split()[0].split("/")
    return split, city, name.removesuffix("_leftImg8bit.png")


def build_archives(tmp: Path) -> tuple[Path, Path, Path, Path]:
    """VOC tar + SBD tgz with the 10,582 train_aug + 1,449 val ids, Cityscapes zips with the 2,975 + 500
    frames, the SBD lists sized like the release (8,498 / 2,857) so `verify_counts` stays on."""
    train_aug = [voc_id(x) for x in read_list(UNIMATCH / "pascal" / "train_aug.txt")]
    val = [voc_id(x) for x in read_list(UNIMATCH / "pascal" / "val.txt")]
    fine = [voc_id(x) for x in read_list(UNIMATCH / "pascal" / "1464" / "labeled.txt")]
    sbd_only = sorted(set(train_aug) - set(fine))
    assert (len(train_aug), len(val), len(fine), len(sbd_only)) == (10582, 1449, 1464, 9118)
    # like the release, SBD also holds VOC train ids and VOC val ids (which prepare must keep out of train)
    sbd_val = sbd_only[8498:] + fine[:1000] + val[:1237]
    voc_sbd_release(tmp / "src", fine, val, sbd_only[:8498], sbd_val)
    voc_tar = tar_of(tmp / "src" / "VOCdevkit", tmp / "VOCtrainval_11-May-2012.tar", "VOCdevkit")
    sbd_tgz = tar_of(tmp / "src" / "benchmark_RELEASE", tmp / "benchmark.tgz", "benchmark_RELEASE")
    cs = UNIMATCH / "cityscapes"
    frames = [
        city_frame(x) for x in read_list(cs / "1_2" / "labeled.txt") + read_list(cs / "1_2" / "unlabeled.txt")
    ]
    frames += [city_frame(x) for x in read_list(cs / "val.txt")]
    assert len(frames) == len(set(frames)) == 3475
    gt, left = cityscapes_zips(tmp / "cs", frames=frames, size=(8, 16))
    return voc_tar, sbd_tgz, gt, left


def test_paper_splits_through_dvc_are_the_published_lists(tmp_path, monkeypatch):
    t0 = time.monotonic()
    voc_tar, sbd_tgz, gt, left = build_archives(tmp_path)
    built = time.monotonic() - t0
    work = copy_repo(tmp_path / "repo")
    params = yaml.safe_load((work / "configs" / "paper.yaml").read_text())
    voc, cs = params["datasets"]["voc"], params["datasets"]["cityscapes"]
    sources = {k: v["source"] for d in (voc, cs) for k, v in d["protocols"].items()}
    assert sources == {"classic": "published", "blended": "generate", "cityscapes": "published"}
    monkeypatch.setenv("CITYSCAPES_USERNAME", USER)
    monkeypatch.setenv("CITYSCAPES_PASSWORD", PASSWORD)
    with LocalServer() as srv:
        for key in pub.MD5:
            srv.add(f"/UniMatch/splits/{key}", UNIMATCH / key)
        Handler.packages = {1: (gt.name, gt.read_bytes()), 3: (left.name, left.read_bytes())}
        voc["source"].update(
            url=srv.add("/voc.tar", voc_tar),
            md5=md5(voc_tar),
            sbd_url=srv.add("/benchmark.tgz", sbd_tgz),
            sbd_md5=md5(sbd_tgz),
        )
        cs["source"].update(url=srv.url)
        for sp in (voc["protocols"]["classic"], cs["protocols"]["cityscapes"]):
            sp["published_url"] = f"{srv.url}/UniMatch/splits"
        params["studies"], params["sweeps"] = {}, {}
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        t1 = time.monotonic()
        out = dvc(["repro", "splits@voc", "splits@cityscapes"], work)
        ran = time.monotonic() - t1
        list_requests = [r for r in Handler.requests if r.startswith("/UniMatch/")]
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"built the archives in {built:.1f} s, dvc repro in {ran:.1f} s")

    splits = work / "data" / "splits"
    for protocol, names in (
        ("classic", ["92", "183", "366", "732", "1464"]),
        ("blended", ["1_16", "1_8", "1_4"]),
    ):
        for split in names:
            for name in ("labeled.txt", "unlabeled.txt"):
                got = read_list(splits / "voc" / protocol / split / name)
                assert got == read_list(UNIMATCH / "pascal" / split / name), (protocol, split, name)
    for name in ("labeled", "unlabeled"):  # UniMatch has no pascal 1_2: CPS's ids (bare ids, sorted)
        got = [voc_id(x) for x in read_list(splits / "voc" / "blended" / "1_2" / f"{name}.txt")]
        assert got == read_list(CPS_VOC / f"train_aug_{name}_1-2.txt")
    for split in ("1_16", "1_8", "1_4", "1_2", "1_30"):
        for name in ("labeled.txt", "unlabeled.txt"):
            got = read_list(splits / "cityscapes" / "cityscapes" / split / name)
            assert got == read_list(UNIMATCH / "cityscapes" / split / name), (split, name)
    assert read_list(splits / "voc" / "classic" / "val.txt") == read_list(UNIMATCH / "pascal" / "val.txt")
    assert read_list(splits / "cityscapes" / "cityscapes" / "val.txt") == read_list(
        UNIMATCH / "cityscapes" / "val.txt"
    )

    meta = json.loads((splits / "voc" / "classic" / "92" / "split.json").read_text())
    assert (meta["source"], meta["n_labeled"], meta["n_unlabeled"]) == ("published", 92, 10490)
    assert meta["published"]["pinned"] == f"LiheYoung/UniMatch@{pub.COMMIT}"
    assert meta["published"]["from"] == f"{srv.url}/UniMatch/splits/pascal/92"
    assert meta["published"]["md5"]["labeled.txt"] == md5(UNIMATCH / "pascal" / "92" / "labeled.txt")
    assert json.loads((splits / "voc" / "blended" / "1_2" / "split.json").read_text())["source"] == "generate"
    # each list fetched once (+ val per dataset), kept in the cache
    reported = {
        "pascal": ["92", "183", "366", "732", "1464"],
        "cityscapes": ["1_16", "1_8", "1_4", "1_2", "1_30"],
    }
    expected = [
        f"{d}/{s}/{n}"
        for d, names in reported.items()
        for s in names
        for n in ("labeled.txt", "unlabeled.txt")
    ]
    expected += ["pascal/val.txt", "cityscapes/val.txt"]
    assert sorted(list_requests) == sorted(f"/UniMatch/splits/{k}" for k in expected)
    assert (
        md5(work / "data" / "published" / "voc" / "pascal" / "1464" / "labeled.txt")
        == pub.MD5["pascal/1464/labeled.txt"]
    )
