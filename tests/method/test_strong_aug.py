"""Strong photometric views (spec §4.1, §7.2-7.3)."""

import pytest
import torch

from pipeline.method.strong_aug import _intensity_op, strong_augment


def _batch(n=4, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, size, size, generator=g).repeat(n, 1, 1, 1)


@pytest.mark.parametrize("intensity_ops", [False, True])
def test_range_shape_and_input_untouched(intensity_ops):
    x = _batch()
    x0 = x.clone()
    out = strong_augment(x, torch.Generator().manual_seed(0), intensity_ops=intensity_ops)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, x0)
    assert out.data_ptr() != x.data_ptr()


def test_deterministic_given_the_generator_seed():
    x = _batch()
    a = strong_augment(x, torch.Generator().manual_seed(0), intensity_ops=True)
    b = strong_augment(x, torch.Generator().manual_seed(0), intensity_ops=True)
    c = strong_augment(x, torch.Generator().manual_seed(1), intensity_ops=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_each_sample_gets_its_own_draws():
    x = _batch(n=4)  # four identical images
    out = strong_augment(x, torch.Generator().manual_seed(0))
    assert any(not torch.allclose(out[0], out[i]) for i in range(1, 4))
    # and the views are actually changed w.r.t. the input
    assert not torch.allclose(out, x)


def test_grayscale_rate_is_about_one_fifth():
    # A colourful image stays coloured through jitter/blur unless RandomGrayscale (p 0.2) fires.
    x = _batch(n=200, size=6, seed=1)
    out = strong_augment(x, torch.Generator().manual_seed(0))
    gray = ((out[:, 0] - out[:, 1]).abs().amax((1, 2)) < 1e-6) & (
        (out[:, 1] - out[:, 2]).abs().amax((1, 2)) < 1e-6
    )
    assert 0.12 < gray.float().mean().item() < 0.28


def test_every_intensity_op_runs_and_stays_in_range():
    # 11 ops drawn uniformly: 300 draws cover each of them (miss probability ~ 11 * (10/11)^300 ~ 0)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(2))
    changed = 0
    for _ in range(300):
        out = _intensity_op(img, g)
        assert out.shape == img.shape and out.dtype == torch.float32
        assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
        changed += int(not torch.allclose(out, img))
    assert changed > 200  # only the identity op (~1/11) leaves the image as it is


@pytest.mark.parametrize("size", [1, 2, 3])
def test_tiny_images_do_not_break_blur_or_sharpness(size):
    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    for seed in range(5):
        out = strong_augment(x, torch.Generator().manual_seed(seed), intensity_ops=True)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_second_device_views_match_cpu_views(second):
    x = _batch(n=3, size=16)
    cpu = strong_augment(x, torch.Generator().manual_seed(0), intensity_ops=True)
    with second.autocast():  # the step draws its strong views inside the fast path's autocast
        gpu = strong_augment(second.to(x), torch.Generator().manual_seed(0), intensity_ops=True)
    assert gpu.device.type == second.device.type and gpu.shape == x.shape and gpu.dtype == x.dtype
    # same draws; kernels differ slightly and uint8 round trips can flip a level
    assert (gpu.cpu() - cpu).abs().mean() < 1e-2  # different draws differ by ~0.1
    if second.kind == "cpu-fast":  # same kernels: autocast must not reach the views (bf16 blur: 0.04)
        assert torch.equal(gpu, cpu)
