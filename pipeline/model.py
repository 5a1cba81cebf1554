"""DeepLabV3+ on torchvision's ResNet (or MobileNetV3) and ASPP, with the two feature-dropout views of DSSN."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenetv3, resnet
from torchvision.models.segmentation.deeplabv3 import ASPP

from pipeline.config import ModelCfg

_RESNETS = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}


MOBILENETS = ("mobilenet_v3_small", "mobilenet_v3_large")


class MobileNetTrunk(nn.Module):
    """torchvision's MobileNetV3 feature stack at a DeepLab output stride, for CPU-sized models.

    Not in the paper (its backbones are ResNets); here so the embedded demo can run thousands of
    steps on a laptop CPU. The stride-2 blocks past `output_stride` become dilated as torchvision's
    own `dilated=True` does it (stride 1, dilation x2 from that block on). `encode` returns the last
    stride-4 features (the DeepLab skip) and the last layer's; `forward` pools them through `fc`
    (identity by default, a linear head for classification pretraining), like a ResNet trunk.
    """

    def __init__(self, arch: str, output_stride: int | None):
        super().__init__()
        setting, last_channel = mobilenetv3._mobilenet_v3_conf(arch)
        stride, dilation, low = 2, 1, 0  # the stem convolution has stride 2
        for i, c in enumerate(setting):
            if c.stride == 2:
                if output_stride is not None and stride * 2 > output_stride:
                    dilation *= 2
                else:
                    stride *= 2
            c.dilation = dilation
            if stride <= 4:
                low = i + 1  # features[0] is the stem, block i is features[i + 1]
        self.features = mobilenetv3.MobileNetV3(setting, last_channel).features
        self.low = low
        self.c1 = setting[low - 1].out_channels
        self.c4 = self.features[-1].out_channels
        self.fc: nn.Module = nn.Identity()

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c1 = self.features[: self.low + 1](x)
        return c1, self.features[self.low + 1 :](c1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encode(x)[1].mean((2, 3)))


class WeightLoadError(RuntimeError):
    """Pretrained weights that do not fit the backbone (lists the offending keys)."""


def _dilate(layer: nn.Sequential, dilation: int) -> None:
    """Turn the stride of a BasicBlock layer into dilation (torchvision refuses it for BasicBlock)."""
    for i, block in enumerate(layer):
        for conv in (block.conv1, block.conv2):
            if conv.stride == (2, 2):
                conv.stride = (1, 1)
            if i > 0 or conv is block.conv2:
                conv.dilation, conv.padding = (dilation, dilation), (dilation, dilation)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def build_backbone(cfg: ModelCfg, dilated: bool = True) -> tuple[nn.Module, int, int]:
    """A ResNet (or MobileNetV3) trunk at the requested output stride (stride 32 when not `dilated`,
    for classification pretraining); returns (net, c1 channels, c4 channels)."""
    if cfg.backbone in MOBILENETS:
        trunk = MobileNetTrunk(cfg.backbone, cfg.output_stride if dilated else None)
        return trunk, trunk.c1, trunk.c4
    dil = [False, False, True] if cfg.output_stride == 16 else [False, True, True]
    bottleneck = cfg.backbone in ("resnet50", "resnet101")
    use_dil = dil if bottleneck and dilated else None
    net = _RESNETS[cfg.backbone](weights=None, replace_stride_with_dilation=use_dil)
    if dilated and not bottleneck:
        if cfg.output_stride == 8:
            _dilate(net.layer3, 2)
            _dilate(net.layer4, 4)
        else:
            _dilate(net.layer4, 2)
    if cfg.deep_stem:
        # ResNet-V1c/"s" stem (UniMatch/CPS weights): 3x3 convs 3-64-64-128, layer1 fed 128 channels.
        net.conv1 = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, 1, 1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 3, 1, 1, bias=False),
        )
        net.bn1 = nn.BatchNorm2d(128)
        net.inplanes = 128
        block = resnet.Bottleneck if bottleneck else resnet.BasicBlock
        # torchvision has already raised net.dilation for the dilated layer4 (2 at OS16, 4 at OS8);
        # _make_layer reads it, and the reference's layer1 is undilated, so build it at dilation 1.
        dilation, net.dilation = net.dilation, 1
        net.layer1 = net._make_layer(block, 64, len(net.layer1))
        net.dilation = dilation
    net.fc = nn.Identity()
    c1 = 256 if bottleneck else 64
    c4 = 2048 if bottleneck else 512
    return net, c1, c4


class DeepLabV3Plus(nn.Module):
    def __init__(self, cfg: ModelCfg, num_classes: int):
        super().__init__()
        self.backbone, c1, c4 = build_backbone(cfg)
        self.aspp = ASPP(c4, list(cfg.aspp_rates), cfg.aspp_channels)
        self.aspp.project[3] = nn.Identity()  # the reference ASPP has no dropout
        self.reduce = nn.Sequential(
            nn.Conv2d(c1, cfg.skip_channels, 1, bias=False),
            nn.BatchNorm2d(cfg.skip_channels),
            nn.ReLU(inplace=True),
        )
        d = cfg.decoder_channels
        self.fuse = nn.Sequential(
            nn.Conv2d(cfg.aspp_channels + cfg.skip_channels, d, 3, padding=1, bias=False),
            nn.BatchNorm2d(d),
            nn.ReLU(inplace=True),
            nn.Conv2d(d, d, 3, padding=1, bias=False),
            nn.BatchNorm2d(d),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(d, num_classes, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.backbone
        if isinstance(b, MobileNetTrunk):
            return b.encode(x)
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        c1 = b.layer1(x)
        c4 = b.layer4(b.layer3(b.layer2(c1)))
        return c1, c4

    def decode(self, c1: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        a = self.aspp(c4)
        a = F.interpolate(a, size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return self.classifier(self.fuse(torch.cat([self.reduce(c1), a], dim=1)))

    def forward(self, x: torch.Tensor, n_fp: int = 0, fp_p: float = 0.5, fp_levels: str = "both"):
        """Logits at input size; with `n_fp` > 0 also `n_fp` channel-dropout views of the same pass.

        The clean and dropped features go through the decoder as one batch (as the reference
        does), so BN statistics mix them; each view draws its own independent dropout masks.
        """
        h, w = x.shape[-2:]
        c1, c4 = self.encode(x)
        if n_fp:
            drop_low = fp_levels == "both"
            c1s = [c1] + [F.dropout2d(c1, fp_p, training=True) if drop_low else c1 for _ in range(n_fp)]
            c4s = [c4] + [F.dropout2d(c4, fp_p, training=True) for _ in range(n_fp)]
            c1, c4 = torch.cat(c1s), torch.cat(c4s)
        out = F.interpolate(self.decode(c1, c4), size=(h, w), mode="bilinear", align_corners=True)
        return out.chunk(n_fp + 1) if n_fp else out

    def param_groups(self, lr: float, head_mult: float) -> list[dict]:
        """Backbone at `lr`, everything else (ASPP, skip, decoder, classifier) at lr x head_mult."""
        head = [p for n, p in self.named_parameters() if not n.startswith("backbone.")]
        return [
            {"params": list(self.backbone.parameters()), "lr": lr, "lr0": lr},
            {"params": head, "lr": lr * head_mult, "lr0": lr * head_mult},
        ]


def load_backbone_weights(model: DeepLabV3Plus, source: str) -> None:
    """Load a backbone state_dict from a URL or file; any missing/unexpected key is an error."""
    if source.startswith(("http://", "https://")):
        state = torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=True, check_hash=True)
    else:
        path = Path(source)
        if not path.exists():
            raise WeightLoadError(f"model.pretrained: weight file {path} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("fc.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise WeightLoadError(
            f"model.pretrained: {source} does not fit the backbone: {len(missing)} missing keys {missing[:8]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:8]}, {len(mismatched)} shape mismatches "
            f"{mismatched[:8]} (deep_stem must match the weights: the reference weights use the 3x3 deep stem)"
        )
    model.backbone.load_state_dict(state, strict=False)


# The reference DeepLabV3Plus (UniMatch/DSSN `model/semseg/deeplabv3plus.py`) names its ASPP
# `head.b0..b4` (b4 = image pooling, its layers under `gap.`) and `head.project`; the trunk, `reduce`,
# `fuse` and `classifier` share our names.
_REFERENCE_PREFIXES = {
    "head.b0.": "aspp.convs.0.",
    "head.b1.": "aspp.convs.1.",
    "head.b2.": "aspp.convs.2.",
    "head.b3.": "aspp.convs.3.",
    "head.b4.gap.": "aspp.convs.4.",
    "head.project.": "aspp.project.",
}


def from_reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A reference (UniMatch/DSSN) model state_dict in our key layout, so a released checkpoint
    loads with `strict=True` (`module.` from DDP is dropped)."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for ref, ours in _REFERENCE_PREFIXES.items():
            if key.startswith(ref):
                key = ours + key.removeprefix(ref)
                break
        out[key] = value
    return out


def build_model(cfg: ModelCfg, num_classes: int) -> DeepLabV3Plus:
    model = DeepLabV3Plus(cfg, num_classes)
    if cfg.pretrained:  # `{backbone}` in the path/URL picks the file of the study's backbone
        load_backbone_weights(model, cfg.pretrained.format(backbone=cfg.backbone))
    return model
