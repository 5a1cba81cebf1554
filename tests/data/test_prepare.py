"""prepare: VOC + SBD merge into train_aug, Cityscapes trainIds, validation, atomicity (fixtures: test_conformance)."""

import numpy as np
import pytest
from PIL import Image

from pipeline.data.errors import DataError
from pipeline.data.prepare import cityscapes_lut, prepare_cityscapes, prepare_voc, read_sbd_mat
from pipeline.data.splits import read_list
from tests.data.builders import cityscapes_zips, palette_png, voc_tree


def test_voc_with_sbd_builds_train_aug(tmp_path):
    voc, sbd = voc_tree(tmp_path / "raw")
    info = prepare_voc(voc, tmp_path / "out", sbd_root=sbd)
    out = tmp_path / "out"
    train = read_list(out / "lists" / "train.txt")
    # (VOC train ∪ SBD train ∪ SBD val) − VOC val: the SBD-val id 2007_000003 is VOC val -> excluded
    assert [line.split()[0] for line in train] == [
        "JPEGImages/2007_000001.jpg",
        "JPEGImages/2007_000002.jpg",
        "JPEGImages/2008_000010.jpg",
    ]
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


def _snapshot(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_sbd_labels_come_from_the_mat_and_images_are_hardlinked(tmp_path):
    voc, sbd = voc_tree(tmp_path / "raw")
    out = tmp_path / "out"
    prepare_voc(voc, out, sbd_root=sbd)
    expected = np.zeros((20, 30), np.uint8)
    expected[5:15, 5:15] = 10  # builders.voc_tree: first SBD-only id gets class 10
    assert np.array_equal(np.array(Image.open(out / "SegmentationClass" / "2008_000010.png")), expected)
    assert np.array_equal(read_sbd_mat(sbd / "cls" / "2008_000010.mat"), expected)
    src, dst = voc / "JPEGImages" / "2007_000001.jpg", out / "JPEGImages" / "2007_000001.jpg"
    assert src.stat().st_ino == dst.stat().st_ino  # hardlink, no copy
    assert read_list(out / "lists" / "train_fine.txt") == [
        "JPEGImages/2007_000001.jpg SegmentationClass/2007_000001.png",
        "JPEGImages/2007_000002.jpg SegmentationClass/2007_000002.png",
    ]
    assert read_list(out / "lists" / "val.txt") == [
        "JPEGImages/2007_000003.jpg SegmentationClass/2007_000003.png"
    ]
    prepare_voc(voc, tmp_path / "copied", link=False)
    assert (tmp_path / "copied" / "JPEGImages" / "2007_000001.jpg").stat().st_ino != src.stat().st_ino


def test_sbd_only_image_falls_back_to_sbd_img(tmp_path):
    from tests.data.builders import jpeg

    voc, sbd = voc_tree(tmp_path / "raw")
    (voc / "JPEGImages" / "2008_000010.jpg").rename(tmp_path / "moved.jpg")
    jpeg(sbd / "img" / "2008_000010.jpg", 20, 30)
    assert prepare_voc(voc, tmp_path / "out", sbd_root=sbd)["train"] == 3
    (sbd / "img" / "2008_000010.jpg").unlink()
    with pytest.raises(DataError, match="2008_000010.jpg: image of id 2008_000010 does not exist"):
        prepare_voc(voc, tmp_path / "out2", sbd_root=sbd)


def test_grayscale_masks_and_own_num_classes(tmp_path):
    """The embedded dataset goes through the same function with its own class count."""
    voc, _ = voc_tree(tmp_path / "raw", train=("a", "b"), val=("c",))
    m = np.zeros((20, 30), np.uint8)
    m[:5] = 6
    m[6] = 255
    Image.fromarray(m).save(voc / "SegmentationClass" / "a.png")  # mode L, like SegmentationClassAug
    assert prepare_voc(voc, tmp_path / "out", num_classes=7) == {"train": 2, "train_fine": 2, "val": 1}
    assert np.array_equal(np.array(Image.open(tmp_path / "out" / "SegmentationClass" / "a.png")), m)
    with pytest.raises(DataError, match=r"a.png: mask values \[6\] outside \[0, 1\]"):
        prepare_voc(voc, tmp_path / "out", num_classes=2)


def test_rgb_mask_missing_mask_and_missing_list_are_errors(tmp_path):
    voc, sbd = voc_tree(tmp_path / "raw")
    Image.new("RGB", (30, 20)).save(voc / "SegmentationClass" / "2007_000002.png")
    with pytest.raises(DataError, match="2007_000002.png: mask must be a palette .* got mode RGB"):
        prepare_voc(voc, tmp_path / "out")
    (voc / "SegmentationClass" / "2007_000002.png").unlink()
    with pytest.raises(DataError, match="no mask for id 2007_000002"):
        prepare_voc(voc, tmp_path / "out")
    (sbd / "cls" / "2008_000010.mat").write_bytes(b"not a mat file")
    palette_png(voc / "SegmentationClass" / "2007_000002.png", np.zeros((20, 30), np.uint8))
    with pytest.raises(DataError, match="2008_000010.mat: not a readable SBD GTcls .mat"):
        prepare_voc(voc, tmp_path / "out", sbd_root=sbd)
    (voc / "ImageSets" / "Segmentation" / "val.txt").unlink()
    with pytest.raises(DataError, match=r"val.txt: id list not found"):
        prepare_voc(voc, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".tmp-out").exists()


def test_cityscapes_failure_keeps_previous_output(tmp_path):
    import zipfile

    from pipeline.data.prepare import CITYSCAPES_TRAIN_IDS

    gt, left = cityscapes_zips(tmp_path / "zips")
    for z in (gt, left):
        zipfile.ZipFile(z).extractall(tmp_path / "cs")
    out = tmp_path / "out"
    prepare_cityscapes(tmp_path / "cs", out)
    before = _snapshot(out)
    assert read_list(out / "lists" / "train_fine.txt") == read_list(out / "lists" / "train.txt")
    label = next((tmp_path / "cs" / "gtFine" / "train").rglob("*_labelIds.png"))
    label.unlink()
    with pytest.raises(DataError, match=f"{label.name}: labelIds file for .* does not exist"):
        prepare_cityscapes(tmp_path / "cs", out)
    Image.fromarray(np.full((16, 32), 40, np.uint8)).save(label)  # 40 is no Cityscapes labelId
    with pytest.raises(DataError, match=r"mask values \[40\]"):
        prepare_cityscapes(tmp_path / "cs", out)
    assert _snapshot(out) == before
    assert len(CITYSCAPES_TRAIN_IDS) == 19 and cityscapes_lut()[7] == 0


def test_cityscapes_lut_matches_cityscapesscripts_when_installed():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    from pipeline.data.prepare import CITYSCAPES_TRAIN_IDS

    table = {lb.id: lb.trainId for lb in labels.labels if lb.id >= 0 and 0 <= lb.trainId < 255}
    assert table == CITYSCAPES_TRAIN_IDS
