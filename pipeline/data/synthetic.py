"""The embedded benchmark: procedural shapes written in the PASCAL VOC layout.

Designed (before any method result was seen) as a small but fair semi-supervised
segmentation task: the class is carried by the *shape* only — colour and texture are drawn
independently of the class — so a model must learn geometry, which labels teach slowly and
unlabeled images can help with. Six object classes with long-tailed frequencies, textured
backgrounds with shape-like clutter, occlusion (painter's order), scale, aspect, rotation and
colour variation, truncation at the border, and a 1-pixel 255 "void" band inside each object
outline like VOC's borders. Every image is a pure function of (seed, split, index).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.io import replace_dir

CLASSES = ["background", "disc", "square", "triangle", "ring", "cross", "star"]
# Long-tailed object frequencies (disc most common, star ~7x rarer).
CLASS_FREQ = np.array([0.34, 0.24, 0.17, 0.12, 0.08, 0.05])
IGNORE = 255


@dataclass(frozen=True)
class Scene:
    """How hard the images are. The defaults are the benchmark's; an easier scene (bigger, fewer,
    plain objects, no clutter, balanced classes) is what a few CPU minutes can learn (the demo).
    The class stays carried by the shape alone in every scene."""

    objects: tuple[int, int] = (1, 4)  # objects per image, inclusive range
    radius: tuple[float, float] = (0.10, 0.32)  # object radius as a fraction of the image size
    aspect: tuple[float, float] = (0.75, 1.33)  # stretch of an object along its own axes
    truncate: bool = True  # objects may leave the image (else they lie wholly inside it)
    clutter: int = 3  # at most this many unlabeled background strokes
    textures: bool = True  # class-independent textures on objects (else solid colours)
    balanced: bool = False  # equal class frequencies (else the long tail, disc ~7x star)
    # grey backgrounds and saturated objects: objectness is seen in the colour, as in photographs
    # where things differ from stuff (else any colour on any colour: objectness from shape alone)
    grey_background: bool = False


def voc_palette() -> list[int]:
    """The standard VOC colour map (bit-interleaved index), 256 RGB triples flattened."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _shape(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of class `cls` in object-local coordinates (unit radius)."""
    r = np.hypot(u, v)
    if cls == 1:  # disc
        return r <= 1.0
    if cls == 2:  # square
        return np.maximum(abs(u), abs(v)) <= 0.8
    if cls == 3:  # triangle (equilateral, vertices on the unit circle)
        s3 = np.sqrt(3.0)
        return (v >= -0.5) & (s3 * u + v <= 1.0) & (-s3 * u + v <= 1.0)
    if cls == 4:  # ring
        return (r <= 1.0) & (r >= 0.55)
    if cls == 5:  # cross
        return ((abs(u) <= 0.3) & (abs(v) <= 1.0)) | ((abs(v) <= 0.3) & (abs(u) <= 1.0))
    if cls == 6:  # five-pointed star
        phi = np.arctan2(v, u)
        return r <= 0.42 + 0.58 * ((np.cos(5 * phi) + 1) / 2) ** 2
    raise ValueError(cls)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid bilinearly upsampled."""
    grid = rng.random((cells + 1, cells + 1))
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _texture(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """A class-independent texture modulation in [0.5, 1.2] (solid, stripes, checker or noise)."""
    kind = rng.integers(4)
    freq = rng.uniform(2.0, 5.0)
    if kind == 0:
        t = np.ones_like(u)
    elif kind == 1:
        t = 0.5 + 0.5 * (np.sin(freq * np.pi * u) > 0)
    elif kind == 2:
        t = 0.5 + 0.5 * ((np.floor(freq * u) + np.floor(freq * v)) % 2)
    else:
        t = 0.6 + 0.6 * _smooth_noise(rng, size, 8)
    return t.astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.1, 1.0, size=3).astype(np.float32)


def _grey(rng: np.random.Generator) -> np.ndarray:
    return np.full(3, rng.uniform(0.15, 0.7), np.float32)


def _saturated(rng: np.random.Generator) -> np.ndarray:
    """A random hue at full saturation, value in [0.6, 1]."""
    hue, value = rng.uniform(0, 6), rng.uniform(0.6, 1.0)
    rgb = np.clip(np.abs((hue + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return (value * rgb).astype(np.float32)


def render(
    seed: int, split: str, index: int, size: int = 64, scene: Scene = Scene()
) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxWx3, label uint8 HxW) pair; deterministic in its arguments."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # Background: two colours blended by smooth noise, plus fine grain.
    back = _grey if scene.grey_background else _random_colour
    c1, c2 = back(rng), back(rng)
    w = _smooth_noise(rng, size, int(rng.integers(2, 6)))[..., None]
    img = c1 * w + c2 * (1 - w)
    img += rng.normal(0, 0.04, size=(size, size, 3)).astype(np.float32)
    label = np.zeros((size, size), np.uint8)

    # Clutter: background strokes with object-like colours (never labelled).
    for _ in range(rng.integers(0, scene.clutter + 1)):
        x0, y0 = rng.uniform(0, size, 2)
        ang = rng.uniform(0, np.pi)
        length, width = rng.uniform(0.2, 0.6) * size, rng.uniform(1.0, 2.5)
        du, dv = (xx - x0) * np.cos(ang) + (yy - y0) * np.sin(ang), -(xx - x0) * np.sin(ang) + (yy - y0) * np.cos(ang)
        stroke = (abs(du) <= length / 2) & (abs(dv) <= width / 2)
        img[stroke] = back(rng)

    # Objects, painted back to front so later ones occlude earlier ones.
    freq = np.full(len(CLASS_FREQ), 1 / len(CLASS_FREQ)) if scene.balanced else CLASS_FREQ
    for _ in range(rng.integers(scene.objects[0], scene.objects[1] + 1)):
        cls = 1 + int(rng.choice(len(freq), p=freq))
        radius = rng.uniform(*scene.radius) * size
        aspect = rng.uniform(*scene.aspect)
        # every shape lies within 1.15 of its unit radius (the square's corners reach 0.8 * sqrt 2)
        margin = 0.0 if scene.truncate else min(0.5, 1.15 * radius * max(aspect, 1 / aspect) / size)
        lo, hi = (-0.05, 1.05) if scene.truncate else (margin, 1 - margin)
        cx, cy = rng.uniform(lo, hi, 2) * size
        ang = rng.uniform(0, 2 * np.pi)
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(ang) + dy * np.sin(ang)) / (radius * aspect)
        v = (-dx * np.sin(ang) + dy * np.cos(ang)) / (radius / aspect)
        inside = _shape(cls, u, v)
        if not inside.any():
            continue
        texture = _texture(rng, u, v, size)[..., None] if scene.textures else 1.0
        shade = texture * (_saturated(rng) if scene.grey_background else _random_colour(rng))
        img = np.where(inside[..., None], shade, img)
        label[inside] = cls

    # VOC-style void band: object pixels on an outline (4-neighbour label change).
    pad = np.pad(label, 1, mode="edge")
    edge = (
        (pad[1:-1, 1:-1] != pad[:-2, 1:-1]) | (pad[1:-1, 1:-1] != pad[2:, 1:-1])
        | (pad[1:-1, 1:-1] != pad[1:-1, :-2]) | (pad[1:-1, 1:-1] != pad[1:-1, 2:])
    )
    label = np.where(edge & (label > 0), IGNORE, label).astype(np.uint8)
    image = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return image, label


def generate(
    out_dir: Path, n_train: int, n_val: int, size: int = 64, seed: int = 0, scene: Scene = Scene()
) -> dict[str, int]:
    """Write the dataset as `VOCdevkit/VOC2012`-style tree into `out_dir` (atomically)."""
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "JPEGImages").mkdir(parents=True)
    (tmp / "SegmentationClass").mkdir()
    (tmp / "ImageSets" / "Segmentation").mkdir(parents=True)
    palette = voc_palette()
    counts: dict[str, int] = {}
    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{split}_{i:06d}" for i in range(n)]
        for i, name in enumerate(tqdm(ids, desc=f"synthetic {split}", unit="img", mininterval=2)):
            image, label = render(seed, split, i, size, scene)
            Image.fromarray(image).save(tmp / "JPEGImages" / f"{name}.jpg", quality=95)
            mask = Image.frombytes("P", (size, size), label.tobytes())
            mask.putpalette(palette)
            mask.save(tmp / "SegmentationClass" / f"{name}.png")
        (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        counts[split] = n
    replace_dir(tmp, out_dir)
    return counts
