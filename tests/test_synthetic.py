import hashlib

import numpy as np
from PIL import Image

from pipeline.data.synthetic import CLASSES, Scene, generate, render, voc_palette

# sha256 of render(0, split, i) for i < 8, train and val, taken before Scene existed: the
# benchmark's images (configs/evidence.yaml and its results) must not move with the demo's knobs
BENCHMARK_SHA = "f611070554d507de22c65edf1f38b0f3d51a86a83094f0e5e243a326e7026fce"
DEMO = Scene(
    objects=(1, 2),
    radius=(0.25, 0.4),
    aspect=(1.0, 1.0),
    truncate=False,
    clutter=0,
    textures=False,
    balanced=True,
    grey_background=True,
)


def test_render_is_deterministic_per_seed():
    a_img, a_lab = render(0, "train", 5)
    b_img, b_lab = render(0, "train", 5)
    c_img, _ = render(1, "train", 5)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(render(0, "val", 5)[0], a_img)


def test_labels_long_tailed_with_void_band():
    counts = np.zeros(256, np.int64)
    for i in range(150):
        _, lab = render(0, "train", i)
        counts += np.bincount(lab.ravel(), minlength=256)
    assert set(np.nonzero(counts)[0]) <= set(range(len(CLASSES))) | {255}
    objects = counts[1 : len(CLASSES)]
    assert objects.min() > 0  # every class appears
    assert objects[0] > 5 * objects[-1]  # disc much more frequent than star
    assert 0.005 < counts[255] / counts.sum() < 0.1  # a thin void band, like VOC borders


def test_palette_matches_voc_colours():
    pal = np.array(voc_palette()).reshape(256, 3)
    assert pal[1].tolist() == [128, 0, 0] and pal[15].tolist() == [192, 128, 128]
    assert pal[255].tolist() == [224, 224, 192]


def test_generate_writes_voc_layout(tmp_path):
    counts = generate(tmp_path / "VOC2012", n_train=6, n_val=3, size=48, seed=2)
    root = tmp_path / "VOC2012"
    assert counts == {"train": 6, "val": 3}
    train = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    assert len(train) == 6
    mask = Image.open(root / "SegmentationClass" / f"{train[0]}.png")
    img = Image.open(root / "JPEGImages" / f"{train[0]}.jpg")
    assert mask.mode == "P" and img.size == mask.size == (48, 48)
    assert np.array_equal(np.array(mask), render(2, "train", 0, 48)[1])
    assert not list(tmp_path.glob(".tmp-*"))


def test_default_scene_is_the_benchmark_bit_for_bit():
    h = hashlib.sha256()
    for split in ("train", "val"):
        for i in range(8):
            img, lab = render(0, split, i, 64)
            h.update(img.tobytes())
            h.update(lab.tobytes())
    assert h.hexdigest() == BENCHMARK_SHA


def test_demo_scene_is_whole_plain_balanced_shapes_on_grey():
    counts = np.zeros(256, np.int64)
    for i in range(300):
        img, lab = render(0, "train", i, 64, DEMO)
        counts += np.bincount(lab.ravel(), minlength=256)
        objects = set(np.unique(lab)) - {0, 255}
        assert 1 <= len(objects) <= 2  # at most two shapes (an occluded one may vanish)
        border = np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])
        assert (border == 0).all()  # wholly inside: no shape is cut by the image border
        rgb = img.astype(np.float32) / 255
        spread = rgb.max(-1) - rgb.min(-1)  # 0 for grey, the value for a saturated hue
        assert spread[lab == 0].mean() < 0.12 and spread[(lab > 0) & (lab < 255)].mean() > 0.45
    share = counts[1:7] / counts[1:7].sum()
    disc_area, triangle_area = np.pi, 3 * np.sqrt(3) / 4  # a shape's share follows its area
    assert share.min() > 0.05 and share[0] / share[2] < 2 * disc_area / triangle_area  # no long tail


def test_scene_knobs_change_the_images():
    base = [render(0, "train", i, 64)[0] for i in range(5)]
    for knob in ({"clutter": 0}, {"textures": False}, {"grey_background": True}, {"truncate": False}):
        imgs = [render(0, "train", i, 64, Scene(**knob))[0] for i in range(5)]
        assert any(not np.array_equal(a, b) for a, b in zip(imgs, base, strict=True)), knob


def test_train_scale_reaches_the_weak_view(tmp_path):
    """`train.scale` [1, 1] with the crop at the image size leaves a labeled sample whole (up to the
    flip); the reference's [0.5, 2.0] rescales it."""
    import torch

    from pipeline.data.datasets import SegList

    generate(tmp_path / "VOC2012", n_train=2, n_val=1, size=48, seed=3)
    lst = tmp_path / "list.txt"
    lst.write_text("JPEGImages/train_000000.jpg SegmentationClass/train_000000.png\n")
    raw = np.array(Image.open(tmp_path / "VOC2012/SegmentationClass/train_000000.png"))
    torch.manual_seed(0)
    same = SegList(tmp_path / "VOC2012", lst, "train_l", crop=48, scale=(1.0, 1.0))
    ref = SegList(tmp_path / "VOC2012", lst, "train_l", crop=48)
    for _ in range(4):
        m = same[0]["mask"].numpy()
        assert np.array_equal(m, raw) or np.array_equal(m, raw[:, ::-1])
    assert any(not np.array_equal(ref[0]["mask"].numpy(), raw) for _ in range(6))


def test_config_scene_defaults_are_the_generators():
    """`datasets.<d>.source.synthetic` repeats Scene's defaults (config imports no numpy): they must
    stay equal, or a params.yaml without scene keys would no longer draw the benchmark."""
    from pipeline.config import SyntheticCfg

    assert SyntheticCfg().scene() == Scene()
