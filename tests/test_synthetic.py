import numpy as np
from PIL import Image

from pipeline.data.synthetic import CLASSES, generate, render, voc_palette


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
