import pytest
import torch

from pipeline.config import ModelCfg
from pipeline.evaluate import (
    background_only_miou,
    confusion_matrix,
    evaluate,
    iou_from_confusion,
    sliding_window_logits,
)
from pipeline.model import build_model


def test_confusion_and_iou_hand_computed():
    target = torch.tensor([[0, 0, 1, 1, 255, 2]])
    pred = torch.tensor([[0, 1, 1, 1, 2, 0]])
    cm = confusion_matrix(pred, target, 3)
    # rows = gt: gt0 -> {0:1, 1:1}; gt1 -> {1:2}; gt2 -> {0:1}; the 255 pixel is skipped
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    iou = iou_from_confusion(cm)
    # class 0: I=1, U=2+2-1=3; class 1: I=2, U=2+3-2=3; class 2: I=0, U=1+0-0=1
    assert torch.allclose(iou, torch.tensor([100 / 3, 200 / 3, 0.0], dtype=torch.double))


def test_iou_accumulates_over_the_set_not_per_image():
    a = confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 1]), 2)
    b = confusion_matrix(torch.tensor([1, 1, 1]), torch.tensor([1, 1, 1]), 2)
    iou = iou_from_confusion(a + b)
    assert torch.allclose(iou, torch.tensor([50.0, 75.0], dtype=torch.double))  # 1/2 and 3/4


def test_sliding_window_equals_whole_image_when_one_window_covers_it():
    # one window only when the image is no larger than the stride int(64 * 2/3) = 42: from 43 px on,
    # the reference also starts a (truncated) window at 42
    torch.manual_seed(0)
    m = build_model(
        ModelCfg(
            backbone="resnet18", deep_stem=False, aspp_channels=16, skip_channels=8, decoder_channels=16
        ),
        4,
    ).eval()
    x = torch.randn(1, 3, 40, 42)
    with torch.no_grad():
        whole = m(x).softmax(1)
        slid = sliding_window_logits(m, x, 4, crop=64)
    assert torch.allclose(whole, slid, atol=1e-6)


def test_sliding_window_visits_reference_positions():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    sliding_window_logits(Probe(), torch.zeros(1, 3, 1024, 2048), 2, crop=801)
    # rows 0, 534; cols 0, 534, 1068, 1602; border windows truncated (dssn-method.md §8)
    assert seen == [
        (801, 801),
        (801, 801),
        (801, 801),
        (801, 446),
        (490, 801),
        (490, 801),
        (490, 801),
        (490, 446),
    ]


def test_sliding_window_starts_past_a_window_that_reached_the_border():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return torch.zeros(x.shape[0], 2, *x.shape[-2:])

    sliding_window_logits(Probe(), torch.zeros(1, 3, 200, 150), 2, crop=100)
    # stride 66: rows 0, 66, 132, 198 and columns 0, 66, 132, as the reference's `while row < h`
    heights, widths = [100, 100, 68, 2], [100, 84, 18]
    assert seen == [(hh, ww) for hh in heights for ww in widths]


def test_evaluate_perfect_model():
    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            lab = (x[:, 0] > 0).long()
            return torch.nn.functional.one_hot(lab, 2).permute(0, 3, 1, 2).float()

    img = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    img[..., :2] = 255
    mask = (img[:, 0] > 0).long()
    ev = evaluate(Oracle(), [{"image": img, "mask": mask}], 2, torch.device("cpu"))
    assert abs(ev["miou"] - 100.0) < 1e-6


def test_background_only_floor_hand_computed():
    # gt rows: 80 + 5 background pixels, 10 + 5 of class 1, none of class 2; predicting background
    # everywhere gives IoU_0 = 85 / 100 = 85 %, IoU_1 = IoU_2 = 0, mIoU = 85 / 3 % (the reference's
    # mean over all classes, absent ones included), whatever the model predicted
    cm = torch.tensor([[80, 5, 0], [10, 5, 0], [0, 0, 0]])
    assert background_only_miou(cm) == pytest.approx(85 / 3)
