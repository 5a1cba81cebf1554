"""Small datasets in the real on-disk formats (VOC palette PNGs, SBD .mat, Cityscapes PNGs)."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

from pipeline.data.synthetic import voc_palette


def palette_png(path: Path, mask: np.ndarray) -> None:
    img = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.astype(np.uint8).tobytes())
    img.putpalette(voc_palette())
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def jpeg(path: Path, h: int, w: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def sbd_mat_bytes(seg: np.ndarray) -> bytes:
    """GTcls struct as SBD stores it: Segmentation (uint8), Boundaries (cell), CategoriesPresent."""
    cats = np.unique(seg[seg > 0]).astype(np.uint8).reshape(-1, 1)
    bounds = np.empty((20, 1), dtype=object)
    for i in range(20):
        bounds[i, 0] = np.zeros(seg.shape, dtype=bool)
    buf = io.BytesIO()
    savemat(
        buf,
        {"GTcls": {"Segmentation": seg.astype(np.uint8), "Boundaries": bounds, "CategoriesPresent": cats}},
    )
    return buf.getvalue()


def sbd_mat(path: Path, seg: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(sbd_mat_bytes(seg))


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def voc_tree(
    root: Path,
    train=("2007_000001", "2007_000002"),
    val=("2007_000003",),
    sbd_only=("2008_000010",),
    size=(20, 30),
) -> tuple[Path, Path]:
    """A `VOCdevkit/VOC2012` tree and an SBD `benchmark_RELEASE/dataset` tree."""
    voc = root / "VOCdevkit" / "VOC2012"
    h, w = size
    for n, i in enumerate((*train, *val, *sbd_only)):
        jpeg(voc / "JPEGImages" / f"{i}.jpg", h, w, seed=n)
    for n, i in enumerate((*train, *val)):
        m = np.zeros((h, w), np.uint8)
        m[2:10, 3:12] = 1 + n
        m[2, 3:12] = 255  # VOC border
        palette_png(voc / "SegmentationClass" / f"{i}.png", m)
    seg = voc / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True)
    (seg / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (seg / "val.txt").write_text("".join(f"{i}\n" for i in val))
    sbd = root / "benchmark_RELEASE" / "dataset"
    for n, i in enumerate((*sbd_only, train[0], val[0])):
        m = np.zeros((h, w), np.uint8)
        m[5:15, 5:15] = 10 + n
        sbd_mat(sbd / "cls" / f"{i}.mat", m)
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in (*sbd_only, train[0])))
    (sbd / "val.txt").write_text(f"{val[0]}\n")  # an SBD id that is VOC val: must stay out of train_aug
    return voc, sbd


def voc_sbd_release(
    root: Path,
    train: list[str],
    val: list[str],
    sbd_train: list[str],
    sbd_val: list[str],
    size: tuple[int, int] = (8, 8),
) -> tuple[Path, Path]:
    """A full-size `VOCdevkit/VOC2012` + SBD `benchmark_RELEASE/dataset` (thousands of ids) in seconds.

    Same formats as `voc_tree` (JPEGs, palette PNGs with a 255 border, GTcls .mat), but the files
    are encoded once per class (1 + n % 20) and their bytes reused: VOC JPEGs for every id, VOC masks
    for train + val, an SBD .mat for every SBD id, and the four id lists as given.
    """
    h, w = size
    voc, sbd = root / "VOCdevkit" / "VOC2012", root / "benchmark_RELEASE" / "dataset"
    jpgs, pngs, mats = [], [], []
    for c in range(1, 21):
        buf = io.BytesIO()
        Image.fromarray(np.full((h, w, 3), 12 * c, np.uint8)).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
        m = np.zeros((h, w), np.uint8)
        m[h // 4 :, w // 4 :] = c
        mats.append(sbd_mat_bytes(m))
        m[0] = 255  # VOC border
        img = Image.frombytes("P", (w, h), m.tobytes())
        img.putpalette(voc_palette())
        pngs.append(_png_bytes(img))
    for d in (voc / "JPEGImages", voc / "SegmentationClass", voc / "ImageSets" / "Segmentation", sbd / "cls"):
        d.mkdir(parents=True)
    for n, i in enumerate(dict.fromkeys([*train, *val, *sbd_train, *sbd_val])):
        (voc / "JPEGImages" / f"{i}.jpg").write_bytes(jpgs[n % 20])
    for n, i in enumerate([*train, *val]):
        (voc / "SegmentationClass" / f"{i}.png").write_bytes(pngs[n % 20])
    for n, i in enumerate(dict.fromkeys([*sbd_train, *sbd_val])):
        (sbd / "cls" / f"{i}.mat").write_bytes(mats[n % 20])
    for folder, name, ids in (
        (voc / "ImageSets" / "Segmentation", "train.txt", train),
        (voc / "ImageSets" / "Segmentation", "val.txt", val),
        (sbd, "train.txt", sbd_train),
        (sbd, "val.txt", sbd_val),
    ):
        (folder / name).write_text("".join(f"{i}\n" for i in ids))
    return voc, sbd


def tar_of(folder: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz" if archive.suffix == ".tgz" else "w") as t:
        t.add(folder, arcname=arcname)
    return archive


def cityscapes_zips(
    root: Path,
    cities=(("train", "aachen", 2), ("val", "frankfurt", 1)),
    size=(16, 32),
    frames: list[tuple[str, str, str]] | None = None,
):
    """(gtFine zip, leftImg8bit zip) with labelIds PNGs (mode L) and RGB PNGs.

    Frames are `<city>_<k:06d>_000019` for k < n per `(split, city, n)` of `cities`, or exactly the
    given `frames` `(split, city, stem)` (e.g. those named in a published list).
    """
    h, w = size
    if frames is None:
        named = [(sp, city, f"{city}_{k:06d}_000019", k) for sp, city, n in cities for k in range(n)]
    else:
        named = [(sp, city, stem, k % 156) for k, (sp, city, stem) in enumerate(frames)]
    ids = np.full((h, w), 7, np.uint8)  # road
    ids[:4] = 23  # sky
    ids[4:6, :5] = 0  # unlabeled
    ids[10:, 20:] = 26  # car
    label = _png_bytes(Image.fromarray(ids))
    gt, left = io.BytesIO(), io.BytesIO()
    with zipfile.ZipFile(gt, "w") as zg, zipfile.ZipFile(left, "w") as zl:
        for split, city, stem, k in named:
            zg.writestr(f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png", label)
            image = _png_bytes(Image.fromarray(np.full((h, w, 3), 100 + k, np.uint8)))
            zl.writestr(f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png", image)
        zg.writestr("README", "gtFine")
    root.mkdir(parents=True, exist_ok=True)
    (root / "gtFine_trainvaltest.zip").write_bytes(gt.getvalue())
    (root / "leftImg8bit_trainvaltest.zip").write_bytes(left.getvalue())
    return root / "gtFine_trainvaltest.zip", root / "leftImg8bit_trainvaltest.zip"
