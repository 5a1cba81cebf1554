"""Conformance with real data: the shared fixtures (VOC/SBD/Cityscapes files) and the published split lists.

Everything is read in place from `../shared`; nothing from there is copied into the repository.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.errors import DataError
from pipeline.data.prepare import cityscapes_lut, prepare_cityscapes, prepare_voc, read_sbd_mat
from pipeline.data.splits import blended_split, make_splits, read_list, write_list

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
FIX = SHARED / "fixtures"
UNIMATCH = SHARED / "splits" / "LiheYoung_UniMatch" / "splits"
CPS = SHARED / "splits" / "charlesCXK_TorchSemiSeg" / "DATA"
needs_fixtures = pytest.mark.skipif(not FIX.is_dir(), reason="../shared/fixtures not present")
needs_lists = pytest.mark.skipif(
    not UNIMATCH.is_dir() or not CPS.is_dir(), reason="../shared/splits not present"
)

SBD_DEMO = FIX / "sbd" / "benchmark_RELEASE" / "benchmark_code_RELEASE" / "demo" / "datadir"
# Cityscapes labelId -> trainId, written out here from datasets.md §3.4 independently of the code under test.
TABLE = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13}
TABLE |= {27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def _ids(path: Path) -> list[str]:
    return [line.split()[0].split("/")[-1].removesuffix(".jpg") for line in read_list(path)]


def _voc_line(i: str) -> str:
    return f"JPEGImages/{i}.jpg SegmentationClass/{i}.png"


# ----------------------------------------------------------------------------- label formats


@needs_fixtures
def test_real_voc_palette_labels_read_as_indices():
    m = Image.open(FIX / "voc" / "SegmentationClassAug_palette" / "2007_000042.png")
    assert m.mode == "P" and set(np.unique(np.array(m))) == {0, 19, 255}
    a = np.array(Image.open(FIX / "voc" / "SegmentationClassAug" / "2007_000129.png"))
    b = np.array(Image.open(FIX / "voc" / "SegmentationClassAug_palette" / "2007_000129.png"))
    assert np.array_equal(a, b)


@needs_fixtures
@pytest.mark.parametrize("i", ["2008_000051", "2008_000195"])
def test_real_sbd_mat_equals_segmentation_class_aug(i):
    mat = read_sbd_mat(SBD_DEMO / "cls" / f"{i}.mat")
    aug = np.array(Image.open(FIX / "voc" / "SegmentationClassAug_palette" / f"{i}.png"))
    assert mat.dtype == np.uint8 and np.array_equal(mat, aug)


@needs_fixtures
def test_prepare_voc_with_sbd_on_real_files(tmp_path):
    """Real JPEGs, real palette masks and real SBD .mat files through prepare_voc: labels = SegmentationClassAug."""
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    fine = ["2007_000042", "2007_000123", "2007_000129"]
    for i in fine:
        os.symlink(
            FIX / "voc" / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{i}.jpg", voc / "JPEGImages" / f"{i}.jpg"
        )
        os.symlink(
            FIX / "voc" / "SegmentationClassAug_palette" / f"{i}.png", voc / "SegmentationClass" / f"{i}.png"
        )
    # one of the VOC ids plays "train" here; the SBD demo's ids are SBD val, so they join train_aug
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000129\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000042\n2007_000123\n")
    out = tmp_path / "prepared"
    info = prepare_voc(voc, out, sbd_root=SBD_DEMO)  # SBD JPEGs come from its img/ folder
    assert info == {"train": 3, "train_fine": 1, "val": 2}
    assert read_list(out / "lists" / "train.txt") == [
        _voc_line(i) for i in ("2007_000129", "2008_000051", "2008_000195")
    ]
    for i in [*fine, "2008_000051", "2008_000195"]:
        got = Image.open(out / "SegmentationClass" / f"{i}.png")
        want = np.array(Image.open(FIX / "voc" / "SegmentationClassAug_palette" / f"{i}.png"))
        assert got.mode == "L" and np.array_equal(np.array(got), want), i
    # the fine VOC ids keep their 255 border, the SBD ones have none (datasets.md §3.3)
    assert 255 in np.array(Image.open(out / "SegmentationClass" / "2007_000129.png"))
    assert 255 not in np.array(Image.open(out / "SegmentationClass" / "2008_000051.png"))
    splits = make_splits(out / "lists", tmp_path / "splits", "blended", ["1_2"], root=out)
    assert splits["1_2"]["n_labeled"] == 2


def _independent_lut() -> np.ndarray:
    return np.array([TABLE.get(i, 255) for i in range(256)], np.uint8)


@needs_fixtures
def test_real_cityscapes_label_ids_to_train_ids(tmp_path):
    assert np.array_equal(cityscapes_lut(), _independent_lut())
    src_img = FIX / "cityscapes" / "leftImg8bit" / "val" / "frankfurt"
    src_gt = FIX / "cityscapes" / "gtFine" / "val" / "frankfurt"
    root = tmp_path / "cs"
    for split in ("train", "val"):  # the fixtures are val frames; they stand in for train too
        for d, src in (("leftImg8bit", src_img), ("gtFine", src_gt)):
            (root / d / split / "frankfurt").mkdir(parents=True)
            for f in src.iterdir():
                os.symlink(f, root / d / split / "frankfurt" / f.name)
    out = tmp_path / "prepared"
    assert prepare_cityscapes(root, out, progress=False) == {"train": 3, "val": 3}
    lines = read_list(out / "lists" / "val.txt")
    assert lines[0] == (
        "leftImg8bit/val/frankfurt/frankfurt_000001_029086_leftImg8bit.png "
        "gtFine/val/frankfurt/frankfurt_000001_029086_gtFine_labelTrainIds.png"
    )
    for line in lines:
        img_rel, mask_rel = line.split()
        ours = np.array(Image.open(out / mask_rel))
        ids = np.array(Image.open(src_gt / Path(mask_rel).name.replace("labelTrainIds", "labelIds")))
        assert np.array_equal(ours, _independent_lut()[ids])
        assert ours.shape == (1024, 2048) and (out / img_rel).is_file()
        rendered = np.array(
            Image.open(FIX / "cityscapes_derived" / "gtFine" / "val" / "frankfurt" / Path(mask_rel).name)
        )
        assert (ours != rendered).mean() < 0.01  # polygon re-rendering differs on edges only
    # instanceIds carry the same labels: id*1000+k for things, id for stuff (datasets.md §3.4)
    inst = np.array(Image.open(src_gt / "frankfurt_000001_029086_gtFine_instanceIds.png")).astype(np.int64)
    ids = np.array(Image.open(src_gt / "frankfurt_000001_029086_gtFine_labelIds.png"))
    assert np.array_equal(np.where(inst >= 1000, inst // 1000, inst), ids)


@needs_fixtures
def test_mmseg_pseudo_cityscapes_train_ids_agree():
    d = FIX / "cityscapes_mmseg_pseudo_256x128" / "gtFine" / "val" / "frankfurt"
    ids = np.array(Image.open(d / "frankfurt_000000_000294_gtFine_labelIds.png"))
    theirs = np.array(Image.open(d / "frankfurt_000000_000294_gtFine_labelTrainIds.png"))
    assert (cityscapes_lut()[ids] != theirs).mean() < 0.01  # their labels were resized separately


# ----------------------------------------------------------------------------- published split lists


@needs_lists
@pytest.mark.parametrize("k", [16, 8, 4, 2])
def test_blended_rule_reproduces_the_cps_lists_exactly(k):
    train_aug = _ids(UNIMATCH / "pascal" / "train_aug.txt")
    lab, unl = blended_split(train_aug[::-1], k)  # input order must not matter
    sub = CPS / "pascal_voc" / "subset_train_aug"
    assert lab == read_list(sub / f"train_aug_labeled_1-{k}.txt")
    assert unl == read_list(sub / f"train_aug_unlabeled_1-{k}.txt")  # CPS: unlabeled in sorted order


@needs_lists
@pytest.mark.parametrize("k", [16, 8, 4])
def test_blended_rule_on_full_lines_reproduces_unimatch_byte_for_byte(k, tmp_path):
    """UniMatch has the same ids in the same order as CPS; its files are our line format."""
    lists = tmp_path / "lists"
    write_list(lists / "train.txt", read_list(UNIMATCH / "pascal" / "train_aug.txt"))
    write_list(lists / "val.txt", read_list(UNIMATCH / "pascal" / "val.txt"))
    make_splits(lists, tmp_path / "out", "blended", [f"1_{k}"])
    for name in ("labeled.txt", "unlabeled.txt"):
        assert (tmp_path / "out" / f"1_{k}" / name).read_bytes() == (
            UNIMATCH / "pascal" / f"1_{k}" / name
        ).read_bytes()


@needs_lists
def test_protocol_counts_match_the_published_table(tmp_path):
    # dssn-method.md §9.3
    lists = tmp_path / "lists"
    write_list(lists / "train.txt", read_list(UNIMATCH / "pascal" / "train_aug.txt"))
    write_list(lists / "val.txt", read_list(UNIMATCH / "pascal" / "val.txt"))
    write_list(lists / "train_fine.txt", read_list(UNIMATCH / "pascal" / "1464" / "labeled.txt"))
    blended = make_splits(lists, tmp_path / "blended", "blended", ["1_16", "1_8", "1_4", "1_2"])
    assert [(v["n_labeled"], v["n_unlabeled"]) for v in blended.values()] == [
        (662, 9920),
        (1323, 9259),
        (2646, 7936),
        (5291, 5291),
    ]
    classic = make_splits(lists, tmp_path / "classic", "classic", ["92", "183", "366", "732", "1464"])
    assert [(v["n_labeled"], v["n_unlabeled"]) for v in classic.values()] == [
        (92, 10490),
        (183, 10399),
        (366, 10216),
        (732, 9850),
        (1464, 9118),
    ]
    fine = set(read_list(lists / "train_fine.txt"))
    assert set(read_list(tmp_path / "classic" / "92" / "labeled.txt")) <= fine
    assert set(read_list(tmp_path / "classic" / "1464" / "unlabeled.txt")) == set(
        read_list(UNIMATCH / "pascal" / "1464" / "unlabeled.txt")
    )
    city = tmp_path / "city_lists"
    cs = UNIMATCH / "cityscapes"
    write_list(
        city / "train.txt", read_list(cs / "1_16" / "labeled.txt") + read_list(cs / "1_16" / "unlabeled.txt")
    )
    write_list(city / "val.txt", read_list(cs / "val.txt"))
    out = make_splits(city, tmp_path / "cs", "cityscapes", ["1_16", "1_8", "1_4", "1_2", "1_30"])
    assert [v["n_labeled"] for v in out.values()] == [186, 372, 744, 1488, 100]
    assert [v["n_unlabeled"] for v in out.values()] == [2789, 2603, 2231, 1487, 2875]
    meta = json.loads((tmp_path / "cs" / "1_30" / "split.json").read_text())
    assert meta["protocol"] == "cityscapes" and meta["n_train"] == 2975


@needs_lists
def test_official_source_accepts_every_published_list(tmp_path):
    lists = tmp_path / "lists"
    write_list(lists / "train.txt", read_list(UNIMATCH / "pascal" / "train_aug.txt"))
    write_list(lists / "val.txt", read_list(UNIMATCH / "pascal" / "val.txt"))
    write_list(lists / "train_fine.txt", read_list(UNIMATCH / "pascal" / "1464" / "labeled.txt"))
    pub = UNIMATCH / "pascal"
    make_splits(
        lists, tmp_path / "c", "classic", ["92", "183", "366", "732", "1464"], "official", official_root=pub
    )
    make_splits(lists, tmp_path / "b", "blended", ["1_16", "1_8", "1_4"], "official", official_root=pub)
    for split, proto in (("92", "c"), ("732", "c"), ("1_8", "b")):
        for name in ("labeled.txt", "unlabeled.txt"):
            assert read_list(tmp_path / proto / split / name) == read_list(pub / split / name)  # order kept
    assert json.loads((tmp_path / "c" / "92" / "split.json").read_text())["source"] == "official"
    with pytest.raises(DataError, match=r"1_2/labeled.txt: published split list file not found"):
        make_splits(lists, tmp_path / "b2", "blended", ["1_2"], "official", official_root=pub)
    fake = tmp_path / "fake" / "1_8"  # the 1/16 lists filed under the wrong name
    fake.mkdir(parents=True)
    for name in ("labeled.txt", "unlabeled.txt"):
        os.symlink(pub / "1_16" / name, fake / name)
    with pytest.raises(DataError, match="662 labeled items.*expects 1323"):
        make_splits(lists, tmp_path / "b3", "blended", ["1_8"], "official", official_root=tmp_path / "fake")
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()


@needs_lists
def test_official_cityscapes_lists(tmp_path):
    cs = UNIMATCH / "cityscapes"
    lists = tmp_path / "lists"
    write_list(
        lists / "train.txt",
        sorted(read_list(cs / "1_2" / "labeled.txt") + read_list(cs / "1_2" / "unlabeled.txt")),
    )
    write_list(lists / "val.txt", read_list(cs / "val.txt"))
    info = make_splits(
        lists,
        tmp_path / "out",
        "cityscapes",
        ["1_16", "1_8", "1_4", "1_2", "1_30"],
        "official",
        official_root=cs,
    )
    assert [v["n_labeled"] for v in info.values()] == [186, 372, 744, 1488, 100]
    # CPS publishes the same Cityscapes ids (its own flattened path format)
    cps = read_list(CPS / "city" / "config_new" / "subset_train" / "train_aug_labeled_1-8.txt")
    cps_names = {line.split()[0].split("/")[-1].removesuffix(".png") for line in cps}
    ours = {
        Path(line.split()[0]).name.removesuffix("_leftImg8bit.png")
        for line in read_list(tmp_path / "out" / "1_8" / "labeled.txt")
    }
    assert ours == cps_names
