"""One prepared layout for every dataset: images + single-channel index masks (255 = ignore).

VOC (and the embedded dataset, which is written in the VOC layout): `JPEGImages/<id>.jpg`,
`SegmentationClass/<id>.png` and `lists/{train,train_fine,val}.txt`. With SBD, train is the
10,582-image `train_aug` = (VOC train ∪ SBD train ∪ SBD val) − VOC val, labelled by the VOC fine
mask (with its 255 border) where one exists and by SBD's `GTcls.Segmentation` otherwise.
Cityscapes: `leftImg8bit/` and `gtFine/*_gtFine_labelTrainIds.png` from the labelIds LUT.
Everything is built in a temp folder and renamed into place only when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.errors import DataError

IGNORE = 255
# Cityscapes labelId -> trainId (cityscapesScripts helpers/labels.py); everything else -> 255.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def cityscapes_lut() -> np.ndarray:
    lut = np.full(256, IGNORE, np.uint8)
    for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
        lut[label_id] = train_id
    return lut


def _ids(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"{path}: id list not found")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _link(src: Path, dst: Path, link: bool) -> None:
    if not src.exists():
        raise DataError(f"{src}: file named in a list does not exist")
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _check_mask(mask: np.ndarray, img_size: tuple[int, int], num_classes: int, name: Path) -> None:
    if (mask.shape[1], mask.shape[0]) != img_size:
        raise DataError(f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                        f"{img_size[0]}x{img_size[1]}")
    bad = np.setdiff1d(np.unique(mask), np.r_[np.arange(num_classes), IGNORE])
    if bad.size:
        raise DataError(f"{name}: mask values {bad.tolist()[:10]} outside [0, {num_classes - 1}] and 255")


def read_sbd_mat(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        return np.asarray(loadmat(str(path))["GTcls"][0]["Segmentation"][0], dtype=np.uint8)
    except Exception as e:  # noqa: BLE001 - any unreadable .mat is reported with its name
        raise DataError(f"{path}: not a readable SBD GTcls .mat file ({e})") from e


def _tmp_for(out_dir: Path) -> Path:
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def prepare_voc(voc_root: Path, out_dir: Path, sbd_root: Path | None = None, num_classes: int = 21,
                link: bool = True) -> dict:
    """VOC layout (+ optional SBD) -> the prepared layout; returns counts."""
    voc_root, out_dir = Path(voc_root), Path(out_dir)
    seg = voc_root / "ImageSets" / "Segmentation"
    fine_train, val = _ids(seg / "train.txt"), _ids(seg / "val.txt")
    train = sorted(fine_train)
    if sbd_root is not None:
        sbd_root = Path(sbd_root)
        extra = set(_ids(sbd_root / "train.txt")) | set(_ids(sbd_root / "val.txt"))
        train = sorted((set(fine_train) | extra) - set(val))
    tmp = _tmp_for(out_dir)
    try:
        (tmp / "JPEGImages").mkdir()
        (tmp / "SegmentationClass").mkdir()
        for i in tqdm(sorted(set(train) | set(val)), desc=f"prepare {out_dir.name}", unit="img", mininterval=2):
            img_path = voc_root / "JPEGImages" / f"{i}.jpg"
            fine = voc_root / "SegmentationClass" / f"{i}.png"
            if fine.exists():
                mask, src = np.array(Image.open(fine)), fine
            elif sbd_root is not None and (sbd_root / "cls" / f"{i}.mat").exists():
                src = sbd_root / "cls" / f"{i}.mat"
                mask = read_sbd_mat(src)
            else:
                raise DataError(f"{fine}: no mask for id {i} (neither VOC SegmentationClass nor SBD cls/{i}.mat)")
            if not img_path.exists():
                raise DataError(f"{img_path}: image named in a list does not exist")
            with Image.open(img_path) as im:
                size = im.size
            if mask.ndim != 2:
                raise DataError(f"{src}: expected a single-channel index mask, got shape {mask.shape}")
            _check_mask(mask, size, num_classes, src)
            _link(img_path, tmp / "JPEGImages" / f"{i}.jpg", link)
            Image.fromarray(mask.astype(np.uint8)).save(tmp / "SegmentationClass" / f"{i}.png")
        (tmp / "lists").mkdir()

        def line(i: str) -> str:
            return f"JPEGImages/{i}.jpg SegmentationClass/{i}.png\n"

        (tmp / "lists" / "train.txt").write_text("".join(map(line, train)))
        (tmp / "lists" / "train_fine.txt").write_text("".join(map(line, sorted(fine_train))))
        (tmp / "lists" / "val.txt").write_text("".join(map(line, sorted(val))))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, out_dir)
    return {"train": len(train), "train_fine": len(fine_train), "val": len(val)}


def prepare_cityscapes(cs_root: Path, out_dir: Path, link: bool = True) -> dict:
    """Cityscapes labelIds -> 19 trainIds (255 elsewhere) via the LUT; leftImg8bit linked."""
    cs_root, out_dir = Path(cs_root), Path(out_dir)
    lut = cityscapes_lut()
    tmp = _tmp_for(out_dir)
    counts = {}
    try:
        (tmp / "lists").mkdir()
        for split in ("train", "val"):
            images = sorted((cs_root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
            if not images:
                raise DataError(f"{cs_root / 'leftImg8bit' / split}: no *_leftImg8bit.png images found")
            lines = []
            for img in tqdm(images, desc=f"prepare cityscapes {split}", unit="img", mininterval=2):
                city, stem = img.parent.name, img.name.removesuffix("_leftImg8bit.png")
                label = cs_root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
                if not label.exists():
                    raise DataError(f"{label}: labelIds file for {img.name} does not exist")
                ids = np.array(Image.open(label))
                with Image.open(img) as im:
                    size = im.size
                _check_mask(ids, size, 34, label)
                rel_img = Path("leftImg8bit") / split / city / img.name
                rel_mask = Path("gtFine") / split / city / f"{stem}_gtFine_labelTrainIds.png"
                (tmp / rel_img).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel_mask).parent.mkdir(parents=True, exist_ok=True)
                _link(img, tmp / rel_img, link)
                Image.fromarray(lut[ids]).save(tmp / rel_mask)
                lines.append(f"{rel_img} {rel_mask}\n")
            (tmp / "lists" / f"{split}.txt").write_text("".join(lines))
            counts[split] = len(lines)
        shutil.copy2(tmp / "lists" / "train.txt", tmp / "lists" / "train_fine.txt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, out_dir)
    return counts
