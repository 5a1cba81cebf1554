"""The paper's networks against the reference code (UniMatch, which the DSSN release forks) on
identical weights and inputs: layer geometry, the pretrained-weight file layout, whole-model
outputs and the feature-dropout views. Skipped where ../shared is absent."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pipeline.config import ModelCfg, load_params
from pipeline.model import build_backbone, build_model, from_reference_state_dict
from tests.conftest import REPO
from tests.reference import reference_modules as reference

BACKBONES = ("resnet50", "resnet101")


def _paper_cfg(backbone: str, **kw) -> ModelCfg:
    """The model of configs/paper.yaml's Table 2 cells on `backbone`, as a user's run builds it."""
    params = load_params(REPO / "configs" / "paper.yaml")
    model, _, _ = params.studies["table2"].cell_sections(params, backbone, "studies.table2")
    return dataclasses.replace(model, **{"pretrained": None, **kw})


def _reference_model(ref_resnet, ref_deeplab, backbone: str, nclass: int = 21) -> nn.Module:
    """The reference DeepLabV3Plus without its hard-wired pretrained load (SOURCES.md)."""
    orig = getattr(ref_resnet, backbone)
    ref_resnet.__dict__[backbone] = lambda pretrained=False, **kw: orig(False, **kw)
    try:
        cfg = {
            "backbone": backbone,
            "replace_stride_with_dilation": [False, False, True],
            "dilations": [6, 12, 18],
            "nclass": nclass,
        }
        return ref_deeplab.DeepLabV3Plus(cfg)
    finally:
        ref_resnet.__dict__[backbone] = orig


def _randomise(model: nn.Module, seed: int) -> None:
    """Non-trivial BN statistics and affine terms, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def _geometry(net: nn.Module) -> dict[str, tuple]:
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = (
                "conv",
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                m.groups,
                m.bias is not None,
            )
        elif isinstance(m, nn.BatchNorm2d):
            out[name] = ("bn", m.num_features, m.eps, m.momentum)
        elif isinstance(m, nn.MaxPool2d):
            out[name] = ("maxpool", m.kernel_size, m.stride, m.padding)
    return out


@pytest.mark.parametrize("backbone", BACKBONES)
def test_trunk_matches_reference_layer_for_layer(backbone):
    with reference("model.backbone.resnet") as (ref_resnet,):
        ref = getattr(ref_resnet, backbone)(False, replace_stride_with_dilation=[False, False, True])
        ours, c1, c4 = build_backbone(_paper_cfg(backbone))
        assert (c1, c4) == (256, 2048)
        ref_geo, our_geo = _geometry(ref), _geometry(ours)
        assert list(our_geo) == list(ref_geo)  # same modules, same order
        diff = {k: (our_geo[k], ref_geo[k]) for k in ref_geo if our_geo[k] != ref_geo[k]}
        assert not diff, f"{len(diff)} layers differ, e.g. {next(iter(diff.items()))}"


@pytest.mark.parametrize("backbone", BACKBONES)
def test_reference_weight_file_loads_and_trunks_agree(backbone, tmp_path):
    """The reference's pretrained/<backbone>.pth layout (trunk keys + an ImageNet fc) loads through
    `model.pretrained` with no missing/unexpected key, and both trunks then compute the same c1, c4."""
    with reference("model.backbone.resnet") as (ref_resnet,):
        torch.manual_seed(1)
        ref = getattr(ref_resnet, backbone)(False, replace_stride_with_dilation=[False, False, True])
        _randomise(ref, 2)
        state = dict(ref.state_dict())
        state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
        torch.save(state, tmp_path / f"{backbone}.pth")
        model = build_model(_paper_cfg(backbone, pretrained=str(tmp_path / "{backbone}.pth")), 21).eval()
        ref.eval()
        x = torch.randn(2, 3, 67, 93)
        with torch.no_grad():
            r = ref.base_forward(x)
            c1, c4 = model.encode(x)
        torch.testing.assert_close(c1, r[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c4, r[3], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_whole_model_and_feature_dropout_views_match_reference(backbone):
    """Reference DeepLabV3Plus weights (its own key layout, `module.` prefix as saved under DDP)
    -> `from_reference_state_dict` -> identical logits, clean and with the same dropout masks."""
    with reference("model.backbone.resnet", "model.semseg.deeplabv3plus") as (ref_resnet, ref_dl):
        torch.manual_seed(3)
        ref = _reference_model(ref_resnet, ref_dl, backbone)
        _randomise(ref, 4)
        ref.eval()
        model = build_model(_paper_cfg(backbone), 21)
        saved = {f"module.{k}": v for k, v in ref.state_dict().items()}
        model.load_state_dict(from_reference_state_dict(saved), strict=True)
        model.eval()
        x = torch.randn(2, 3, 65, 81)  # odd sizes: padding and align_corners upsampling matter
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)

            # UniMatch's single feature-dropout view (same RNG state -> same Dropout2d masks)
            torch.manual_seed(5)
            ref_clean, ref_fp = ref(x, need_fp=True)
            torch.manual_seed(5)
            clean, fp = model(x, n_fp=1)
            torch.testing.assert_close(clean, ref_clean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(fp, ref_fp, rtol=1e-4, atol=1e-4)

            # DSSN's two views (deeplabv3plus2fp.py: two Dropout2d(0.5) draws on c1, then two on c4,
            # one decoder call on the 3x batch), composed here from the reference trunk and decoder
            torch.manual_seed(6)
            feats = ref.backbone.base_forward(x)
            c1, c4 = feats[0], feats[-1]
            c1s = torch.cat((c1, nn.Dropout2d(0.5)(c1), nn.Dropout2d(0.5)(c1)))
            c4s = torch.cat((c4, nn.Dropout2d(0.5)(c4), nn.Dropout2d(0.5)(c4)))
            outs = nn.functional.interpolate(
                ref._decode(c1s, c4s), size=x.shape[-2:], mode="bilinear", align_corners=True
            ).chunk(3)
            torch.manual_seed(6)
            ours = model(x, n_fp=2)
            for a, b in zip(ours, outs, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_reference_keys_map_one_to_one():
    """Every reference key has exactly one project key and back (no silent strict=False)."""
    with reference("model.backbone.resnet", "model.semseg.deeplabv3plus") as (ref_resnet, ref_dl):
        ref = _reference_model(ref_resnet, ref_dl, "resnet50")
        mapped = from_reference_state_dict(ref.state_dict())
        ours = build_model(_paper_cfg("resnet50"), 21).state_dict()
        assert sorted(mapped) == sorted(ours)
        assert all(mapped[k].shape == ours[k].shape for k in ours)
