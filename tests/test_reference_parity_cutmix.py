"""CutMix parity: boxes and compositing against the reference (`dataset/transform.py`, `unimatch.py`).

Box: `sample_boxes` and the reference `obtain_cutmix_box` are fed the same scripted draws (the box
coin, the area, then aspect/x/y until the box fits) and must give the same mask. Compositing:
`paste` against the reference's rule in `unimatch.py` (not importable: it is inline in `main`) —
strong image `img_s[box.unsqueeze(1).expand(img_s.shape) == 1] = img_mix[...]` over all channels;
pseudo-label, confidence and ignore map `x[box == 1] = x_mix[box == 1]` — on the reference's boxes.
The project composites the teacher's *logits* and takes softmax/argmax afterwards; per pixel that
equals compositing the confidence and the argmax, which the last test checks.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

import pipeline.method.cutmix as cutmix
from tests.reference import reference_modules


@pytest.fixture(scope="module")
def ref_transform():
    with reference_modules("dataset.transform") as (mod,):
        yield mod


class _Script:
    """One stream of draws: uniform fractions and integers, consumed in call order."""

    def __init__(self, seed: int, size: int):
        g = np.random.default_rng(seed)
        self.fracs = list(g.random(400))
        self.ints = list(g.integers(0, size, 800))

    def frac(self) -> float:
        return float(self.fracs.pop(0))

    def int(self) -> int:
        return int(self.ints.pop(0))


def _ref_box(transform, monkeypatch, script: _Script, size: int, p: float) -> torch.Tensor:
    fake_np_random = types.SimpleNamespace(
        uniform=lambda lo, hi: lo + (hi - lo) * script.frac(), randint=lambda lo, hi: script.int()
    )
    monkeypatch.setattr(transform, "np", types.SimpleNamespace(random=fake_np_random, sqrt=np.sqrt))
    monkeypatch.setattr(transform, "random", types.SimpleNamespace(random=script.frac))
    return transform.obtain_cutmix_box(size, p=p)


def _our_box(monkeypatch, script: _Script, size: int, p: float) -> torch.Tensor:
    monkeypatch.setattr(cutmix, "_u", lambda g, lo=0.0, hi=1.0: lo + (hi - lo) * script.frac())
    monkeypatch.setattr(
        cutmix.torch, "randint", lambda lo, hi, shape, generator=None: torch.tensor(script.int())
    )
    return cutmix.sample_boxes(1, size, p=p)[0]


@pytest.mark.parametrize("size", [64, 321, 801])
def test_box_matches_reference_on_the_same_draws(ref_transform, monkeypatch, size):
    n_box = 0
    for seed in range(12):
        ref = _ref_box(ref_transform, monkeypatch, _Script(seed, size), size, p=0.5)
        ours = _our_box(monkeypatch, _Script(seed, size), size, p=0.5)
        assert torch.equal(ours, ref == 1), seed
        n_box += int(ref.any())
    assert 0 < n_box < 12  # both the box and the no-box branch were taken


def _ref_paste_image(img_s, img_mix, box):
    out = img_s.clone()
    out[box.unsqueeze(1).expand(out.shape) == 1] = img_mix[box.unsqueeze(1).expand(out.shape) == 1]
    return out


def _ref_paste_map(x, x_mix, box):
    out = x.clone()
    out[box == 1] = x_mix[box == 1]
    return out


def _reference_boxes(transform, monkeypatch, n: int, size: int) -> torch.Tensor:
    boxes = torch.stack([_ref_box(transform, monkeypatch, _Script(i, size), size, p=0.5) for i in range(n)])
    assert boxes.dtype == torch.float32 and 0 < boxes.flatten(1).any(1).sum() < n
    return boxes


def test_paste_matches_reference_rule(ref_transform, monkeypatch):
    n, size, c = 6, 65, 19
    boxes = _reference_boxes(ref_transform, monkeypatch, n, size)
    g = torch.Generator().manual_seed(1)
    img, img_mix = torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)
    assert torch.equal(cutmix.paste(img, img_mix, boxes), _ref_paste_image(img, img_mix, boxes))

    ign, ign_mix = (torch.rand(n, size, size, generator=g) < 0.3 for _ in range(2))
    ref_ign = _ref_paste_map(ign.long() * 255, ign_mix.long() * 255, boxes)  # reference: 0/255 maps
    assert torch.equal(cutmix.paste(ign, ign_mix, boxes), ref_ign == 255)

    logit_w, logit_m = torch.randn(n, c, size, size, generator=g), torch.randn(n, c, size, size, generator=g)
    conf_w, lab_w = logit_w.softmax(1).max(1)
    conf_m, lab_m = logit_m.softmax(1).max(1)
    mixed = cutmix.paste(logit_w, logit_m, boxes).softmax(1)
    assert torch.equal(mixed.argmax(1), _ref_paste_map(lab_w, lab_m, boxes))
    assert torch.equal(mixed.max(1).values, _ref_paste_map(conf_w, conf_m, boxes))
