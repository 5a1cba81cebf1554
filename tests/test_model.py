import pytest
import torch

from pipeline.config import ModelCfg
from pipeline.model import WeightLoadError, build_model, load_backbone_weights

SMALL = dict(aspp_channels=16, skip_channels=8, decoder_channels=16)


@pytest.mark.parametrize(
    ("backbone", "deep_stem"), [("resnet18", False), ("resnet18", True), ("resnet50", True)]
)
def test_output_shape_and_fp_views(backbone, deep_stem):
    torch.manual_seed(0)
    m = build_model(ModelCfg(backbone=backbone, deep_stem=deep_stem, **SMALL), num_classes=5)
    x = torch.randn(2, 3, 48, 48)
    assert m(x).shape == (2, 5, 48, 48)
    clean, fp1, fp2 = m(x, n_fp=2)
    assert clean.shape == fp1.shape == fp2.shape == (2, 5, 48, 48)
    assert not torch.allclose(fp1, fp2)  # independent dropout masks


def test_output_stride_16():
    m = build_model(ModelCfg(backbone="resnet18", deep_stem=False, **SMALL), num_classes=3)
    c1, c4 = m.encode(torch.randn(1, 3, 64, 64))
    assert c1.shape[-1] == 16 and c4.shape[-1] == 4


def test_paper_model_sizes():
    # dssn-method.md §5.2: 59.5M (R101) and 40.5M (R50) parameters in the reference logs.
    for backbone, millions in (("resnet101", 59.5), ("resnet50", 40.5)):
        m = build_model(ModelCfg(backbone=backbone, deep_stem=True), num_classes=21)
        assert round(sum(p.numel() for p in m.parameters()) / 1e6, 1) == millions


def test_deep_stem_key_layout_and_strict_loading(tmp_path):
    m = build_model(ModelCfg(backbone="resnet18", deep_stem=True, **SMALL), num_classes=3)
    keys = set(m.backbone.state_dict())
    assert {
        "conv1.0.weight",
        "conv1.1.weight",
        "conv1.3.weight",
        "conv1.4.running_mean",
        "conv1.6.weight",
        "bn1.weight",
    } <= keys
    state = {
        k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in m.backbone.state_dict().items()
    }
    state["fc.weight"] = torch.zeros(1000, 512)  # classifier keys are ignored
    torch.save(state, tmp_path / "ok.pth")
    m2 = build_model(ModelCfg(backbone="resnet18", deep_stem=True, **SMALL), num_classes=3)
    load_backbone_weights(m2, str(tmp_path / "ok.pth"))
    assert torch.all(m2.backbone.layer1[0].conv1.weight == 0.5)

    bad = dict(state)
    bad.pop("layer2.0.conv1.weight")
    bad["layer9.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(WeightLoadError) as err:
        load_backbone_weights(m2, str(tmp_path / "bad.pth"))
    assert "layer2.0.conv1.weight" in str(err.value) and "layer9.weight" in str(err.value)

    tv = build_model(ModelCfg(backbone="resnet18", deep_stem=False, **SMALL), num_classes=3)
    with pytest.raises(WeightLoadError, match="conv1.weight"):
        load_backbone_weights(tv, str(tmp_path / "ok.pth"))  # deep-stem weights into a 7x7 stem


def test_head_lr_groups():
    m = build_model(ModelCfg(backbone="resnet18", deep_stem=False, **SMALL), num_classes=3)
    groups = m.param_groups(0.01, 10.0)
    assert groups[0]["lr"] == 0.01 and groups[1]["lr"] == pytest.approx(0.1)
    n_all = sum(p.numel() for p in m.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == n_all


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "mobilenet_v3_large"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_mobilenet_trunk_strides_views_and_weights(backbone, output_stride, tmp_path):
    """The CPU-sized trunks (beyond the paper): skip at stride 4, high level at the output stride,
    the feature-dropout views, and their own state_dict through the key-checked loader."""
    torch.manual_seed(0)
    cfg = ModelCfg(backbone=backbone, deep_stem=False, output_stride=output_stride, **SMALL)
    m = build_model(cfg, num_classes=5)
    c1, c4 = m.encode(torch.randn(2, 3, 64, 64))
    assert c1.shape[-1] == 16 and c4.shape[-1] == 64 // output_stride
    assert c1.shape[1] == m.backbone.c1 and c4.shape[1] == m.backbone.c4
    x = torch.randn(2, 3, 48, 48)
    clean, fp1, fp2 = m(x, n_fp=2)
    assert clean.shape == fp1.shape == (2, 5, 48, 48) and not torch.allclose(fp1, fp2)
    torch.save(build_model(cfg, num_classes=5).backbone.state_dict(), tmp_path / "w.pt")
    load_backbone_weights(m, str(tmp_path / "w.pt"))
    with pytest.raises(WeightLoadError):
        load_backbone_weights(m, str(tmp_path / "w.pt").replace("w.pt", "missing.pt"))


def test_mobilenet_refuses_the_resnet_deep_stem():
    from pipeline.config import ConfigError, build

    with pytest.raises(ConfigError, match="deep_stem"):
        build(ModelCfg, {"backbone": "mobilenet_v3_small", "deep_stem": True}, "model")
