"""One prepared layout for every dataset: images + single-channel index masks (255 = ignore) + lists.

VOC (and the embedded dataset, which is written in the VOC layout): `JPEGImages/<id>.jpg`,
`SegmentationClass/<id>.png` (mode L) and `lists/{train,train_fine,val}.txt`. With SBD, train is the
10,582-image `train_aug` = (VOC train ∪ SBD train ∪ SBD val) − VOC val, labelled by the VOC fine
mask (with its 255 border) wherever one exists and by SBD's `GTcls.Segmentation` otherwise.
Cityscapes: `leftImg8bit/` linked and `gtFine/*_gtFine_labelTrainIds.png` = LUT[labelIds] (the
deterministic mapping; re-rendering polygons differs on ~0.3-0.5 % of edge pixels).
Everything is built in `.tmp-<name>` beside the output and renamed into place only when complete,
so a failure leaves the previous output untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.data.errors import DataError
from pipeline.io import replace_dir

IGNORE = 255
# Cityscapes labelId -> trainId (cityscapesScripts helpers/labels.py); every other id -> 255.
CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
CITYSCAPES_NUM_LABEL_IDS = 34  # labelIds PNGs hold 0..33


def cityscapes_train_ids() -> dict[int, int]:
    """labelId -> trainId from cityscapesscripts when installed (the source of truth), else our table."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError:
        return dict(CITYSCAPES_TRAIN_IDS)
    return {lb.id: lb.trainId for lb in labels if 0 <= lb.id < 256 and 0 <= lb.trainId < IGNORE}


def cityscapes_lut() -> np.ndarray:
    lut = np.full(256, IGNORE, np.uint8)
    for label_id, train_id in cityscapes_train_ids().items():
        lut[label_id] = train_id
    return lut


def _ids(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: id list not found")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate ids in the list")
    return ids


def _link(src: Path, dst: Path, link: bool) -> None:
    """Hardlink (no extra disk for 17k JPEGs) where the filesystem allows it, else copy."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _open_size(path: Path, what: str) -> tuple[int, int]:
    if not path.is_file():
        raise DataError(f"{path}: {what} does not exist")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: unreadable {what} ({e})") from e


def read_mask(path: Path) -> np.ndarray:
    """Index mask from a palette (P) or grayscale (L) PNG; colours would silently give wrong classes."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise DataError(
                    f"{path}: mask must be a palette (P) or grayscale (L) PNG, got mode {im.mode}"
                )
            return np.array(im)
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: unreadable mask ({e})") from e


def read_sbd_mat(path: Path) -> np.ndarray:
    """`GTcls.Segmentation` of an SBD cls/*.mat (uint8 0..20, no void band)."""
    from scipy.io import loadmat

    try:
        seg = loadmat(str(path))["GTcls"][0, 0]["Segmentation"]
    except Exception as e:  # noqa: BLE001 - any unreadable .mat is reported with its name
        raise DataError(f"{path}: not a readable SBD GTcls .mat file ({type(e).__name__}: {e})") from e
    seg = np.asarray(seg)
    if seg.ndim != 2:
        raise DataError(f"{path}: GTcls.Segmentation should be HxW, got shape {seg.shape}")
    if seg.size and (seg.min() < 0 or seg.max() > 255):
        raise DataError(f"{path}: GTcls.Segmentation values outside 0..255")
    return seg.astype(np.uint8)


def check_mask(mask: np.ndarray, img_size: tuple[int, int], num_classes: int, name: Path) -> None:
    """Same size as the image and values in [0, num_classes) ∪ {255}, else DataError naming the file."""
    if mask.ndim != 2:
        raise DataError(f"{name}: expected a single-channel index mask, got shape {mask.shape}")
    if (mask.shape[1], mask.shape[0]) != tuple(img_size):
        raise DataError(
            f"{name}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is {img_size[0]}x{img_size[1]}"
        )
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE)]
    if bad.size:
        raise DataError(
            f"{name}: mask values {bad.tolist()[:10]} outside [0, {num_classes - 1}] ∪ {{255}} "
            f"(num_classes={num_classes})"
        )


def _tmp_for(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp




def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(f"{line}\n" for line in lines))


def _voc_line(i: str) -> str:
    return f"JPEGImages/{i}.jpg SegmentationClass/{i}.png"


def prepare_voc(
    voc_root: Path,
    out_dir: Path,
    sbd_root: Path | None = None,
    num_classes: int = 21,
    link: bool = True,
    progress: bool = True,
) -> dict:
    """VOC layout (+ optional SBD) -> the prepared layout, every pair validated; returns counts."""
    voc_root, out_dir = Path(voc_root), Path(out_dir)
    if not 0 < num_classes <= IGNORE:
        raise DataError(f"num_classes must be in 1..255, got {num_classes}")
    seg = voc_root / "ImageSets" / "Segmentation"
    fine_train, val = _ids(seg / "train.txt"), _ids(seg / "val.txt")
    if not fine_train:
        raise DataError(f"{seg / 'train.txt'}: no ids")
    if not val:
        raise DataError(f"{seg / 'val.txt'}: no ids")
    both = set(fine_train) & set(val)
    if both:
        raise DataError(f"{seg}: {len(both)} ids in both train.txt and val.txt, e.g. {min(both)!r}")
    train = sorted(fine_train)
    if sbd_root is not None:
        sbd_root = Path(sbd_root)
        extra = set(_ids(sbd_root / "train.txt")) | set(_ids(sbd_root / "val.txt"))
        train = sorted((set(fine_train) | extra) - set(val))

    counts = {
        "train": len(train),
        "train_fine": len(fine_train),
        "val": len(val),
    }
    tmp = _tmp_for(out_dir)
    try:
        (tmp / "JPEGImages").mkdir()
        (tmp / "SegmentationClass").mkdir()
        all_ids = sorted(set(train) | set(val))
        bar = tqdm(all_ids, desc=f"prepare {out_dir.name}", unit="img", mininterval=2, disable=not progress)
        for i in bar:
            img_path = voc_root / "JPEGImages" / f"{i}.jpg"
            if not img_path.is_file() and sbd_root is not None and (sbd_root / "img" / f"{i}.jpg").is_file():
                img_path = sbd_root / "img" / f"{i}.jpg"
            size = _open_size(img_path, f"image of id {i}")
            fine = voc_root / "SegmentationClass" / f"{i}.png"
            if fine.is_file():
                mask, src = read_mask(fine), fine
            elif sbd_root is not None and (sbd_root / "cls" / f"{i}.mat").is_file():
                src = sbd_root / "cls" / f"{i}.mat"
                mask = read_sbd_mat(src)
            else:
                where = "SegmentationClass" + (" nor SBD cls/" + f"{i}.mat" if sbd_root is not None else "")
                raise DataError(f"{fine}: no mask for id {i} (not in VOC {where})")
            check_mask(mask, size, num_classes, src)
            _link(img_path, tmp / "JPEGImages" / f"{i}.jpg", link)
            Image.fromarray(mask.astype(np.uint8, copy=False)).save(tmp / "SegmentationClass" / f"{i}.png")
        (tmp / "lists").mkdir()
        _write_lines(tmp / "lists" / "train.txt", map(_voc_line, train))
        _write_lines(tmp / "lists" / "train_fine.txt", map(_voc_line, sorted(fine_train)))
        _write_lines(tmp / "lists" / "val.txt", map(_voc_line, sorted(val)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out_dir)
    return counts


def prepare_cityscapes(cs_root: Path, out_dir: Path, link: bool = True, progress: bool = True) -> dict:
    """Cityscapes labelIds -> 19 trainIds (255 elsewhere) via the LUT; leftImg8bit linked; UniMatch lists."""
    cs_root, out_dir = Path(cs_root), Path(out_dir)
    lut = cityscapes_lut()
    tmp = _tmp_for(out_dir)
    counts = {}
    try:
        (tmp / "lists").mkdir()
        for split in ("train", "val"):
            images = sorted((cs_root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
            if not images:
                raise DataError(
                    f"{cs_root / 'leftImg8bit' / split}: no <city>/*_leftImg8bit.png images found"
                )
            lines = []
            bar = tqdm(
                images, desc=f"prepare cityscapes {split}", unit="img", mininterval=2, disable=not progress
            )
            for img in bar:
                city, stem = img.parent.name, img.name.removesuffix("_leftImg8bit.png")
                label = cs_root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
                if not label.is_file():
                    raise DataError(f"{label}: labelIds file for {img.name} does not exist")
                ids = read_mask(label)
                check_mask(ids, _open_size(img, "image"), CITYSCAPES_NUM_LABEL_IDS, label)
                rel_img = f"leftImg8bit/{split}/{city}/{img.name}"
                rel_mask = f"gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png"
                (tmp / rel_img).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel_mask).parent.mkdir(parents=True, exist_ok=True)
                _link(img, tmp / rel_img, link)
                Image.fromarray(lut[ids]).save(tmp / rel_mask)
                lines.append(f"{rel_img} {rel_mask}")
            _write_lines(tmp / "lists" / f"{split}.txt", lines)
            counts[split] = len(lines)
        # Cityscapes has no coarse/fine distinction inside gtFine: every train frame is "fine".
        shutil.copy2(tmp / "lists" / "train.txt", tmp / "lists" / "train_fine.txt")
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    replace_dir(tmp, out_dir)
    return counts
