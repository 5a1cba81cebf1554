"""prepare: VOC + SBD merge into train_aug, Cityscapes trainIds, validation, atomicity, real fixtures."""

import numpy as np
import pytest
from PIL import Image

from pipeline.data.errors import DataError
from pipeline.data.prepare import cityscapes_lut, prepare_cityscapes, prepare_voc, read_sbd_mat
from pipeline.data.splits import read_list
from tests.conftest import SHARED
from tests.data.builders import cityscapes_zips, palette_png, voc_tree

FIX = SHARED / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIX.exists(), reason="../shared/fixtures not present")


def test_voc_with_sbd_builds_train_aug(tmp_path):
    voc, sbd = voc_tree(tmp_path / "raw")
    info = prepare_voc(voc, tmp_path / "out", sbd_root=sbd)
    out = tmp_path / "out"
    train = read_list(out / "lists" / "train.txt")
    # (VOC train ∪ SBD train ∪ SBD val) − VOC val: the SBD-val id 2007_000003 is VOC val -> excluded
    assert [line.split()[0] for line in train] == [
        "JPEGImages/2007_000001.jpg", "JPEGImages/2007_000002.jpg", "JPEGImages/2008_000010.jpg"]
    assert info == {"train": 3, "train_fine": 2, "val": 1}
    fine = np.array(Image.open(out / "SegmentationClass" / "2007_000001.png"))
    assert Image.open(out / "SegmentationClass" / "2007_000001.png").mode == "L"
    assert set(np.unique(fine)) == {0, 1, 255}  # VOC label wins over SBD, 255 border kept
    sbd_only = np.array(Image.open(out / "SegmentationClass" / "2008_000010.png"))
    assert set(np.unique(sbd_only)) == {0, 10}


def test_voc_without_sbd_uses_the_fine_train_list(tmp_path):
    voc, _ = voc_tree(tmp_path / "raw")
    info = prepare_voc(voc, tmp_path / "out")
    assert info == {"train": 2, "train_fine": 2, "val": 1}


def test_bad_masks_are_named_and_the_previous_output_survives(tmp_path):
    voc, _ = voc_tree(tmp_path / "raw")
    prepare_voc(voc, tmp_path / "out")
    bad = np.zeros((20, 30), np.uint8)
    bad[0, 0] = 42
    palette_png(voc / "SegmentationClass" / "2007_000002.png", bad)
    with pytest.raises(DataError, match=r"2007_000002.png: mask values \[42\]"):
        prepare_voc(voc, tmp_path / "out")
    palette_png(voc / "SegmentationClass" / "2007_000002.png", np.zeros((10, 30), np.uint8))
    with pytest.raises(DataError, match="2007_000002.png: mask is 30x10 but its image is 30x20"):
        prepare_voc(voc, tmp_path / "out")
    (voc / "JPEGImages" / "2007_000003.jpg").unlink()
    palette_png(voc / "SegmentationClass" / "2007_000002.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(DataError, match="2007_000003.jpg"):
        prepare_voc(voc, tmp_path / "out")
    assert len(read_list(tmp_path / "out" / "lists" / "train.txt")) == 2  # earlier output intact
    assert not (tmp_path / ".tmp-out").exists()


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    import zipfile

    gt, left = cityscapes_zips(tmp_path / "zips")
    for z in (gt, left):
        zipfile.ZipFile(z).extractall(tmp_path / "cs")
    info = prepare_cityscapes(tmp_path / "cs", tmp_path / "out")
    assert info == {"train": 2, "val": 1}
    line = read_list(tmp_path / "out" / "lists" / "val.txt")[0]
    img_rel, mask_rel = line.split()
    assert mask_rel == "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png"
    m = np.array(Image.open(tmp_path / "out" / mask_rel))
    assert m[0, 0] == 10 and m[8, 0] == 0 and m[12, 25] == 13 and m[4, 0] == 255  # sky, road, car, unlabeled


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
    mat = read_sbd_mat(FIX / "sbd/benchmark_RELEASE/benchmark_code_RELEASE/demo/datadir/cls" / f"{i}.mat")
    aug = np.array(Image.open(FIX / "voc" / "SegmentationClassAug_palette" / f"{i}.png"))
    assert mat.dtype == np.uint8 and np.array_equal(mat, aug)


@needs_fixtures
def test_real_cityscapes_label_ids_to_train_ids(tmp_path):
    # LUT written independently from the cityscapesScripts table (datasets.md §3.4)
    table = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    expected_lut = np.array([table.get(i, 255) for i in range(256)], np.uint8)
    assert np.array_equal(cityscapes_lut(), expected_lut)
    gt = FIX / "cityscapes" / "gtFine" / "val" / "frankfurt"
    for label in sorted(gt.glob("*_gtFine_labelIds.png")):
        ids = np.array(Image.open(label))
        ours = cityscapes_lut()[ids]
        rendered = np.array(Image.open(FIX / "cityscapes_derived/gtFine/val/frankfurt" /
                                       label.name.replace("labelIds", "labelTrainIds")))
        assert (ours != rendered).mean() < 0.01  # polygon re-rendering differs on edges only
