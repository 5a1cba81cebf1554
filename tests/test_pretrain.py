"""The warm start: pretext weights load into the segmentation trunk, the stage is idempotent,
the pretext images are disjoint from the benchmark's, and a changed backbone is a new experiment."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import ConfigError, ModelCfg, PretrainCfg, load_params
from pipeline.data.synthetic import render
from pipeline.model import build_model
from pipeline.orchestrate import fingerprint, study_specs
from pipeline.pretrain import classifier, pretrain, render_set
from tests.conftest import REPO

TINY = PretrainCfg(backbone="resnet18", seed=1, n_images=64, n_val=16, size=32, steps=3, batch=8, threads=1)


def test_targets_mark_exactly_the_shapes_visible_in_the_label():
    data = render_set(1, "train", 6, 48, "test")
    for i in range(6):
        _, label = render(1, "train", i, 48)
        counts = np.bincount(label.ravel(), minlength=256)
        expected = [float(counts[c] > 0) for c in range(1, 7)]  # void band (255) is not a class
        assert data.targets[i].tolist() == expected
        assert data.images.shape == (6, 3, 48, 48) and data.images.dtype == torch.uint8


def test_classifier_runs_at_stride_32_and_segmentation_trunk_at_16():
    net = classifier(TINY).eval()
    feats = {}
    net.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("c4", o))
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 6)
    assert feats["c4"].shape[-1] == 2  # 64 / 32
    seg = build_model(ModelCfg(backbone="resnet18", deep_stem=False), 7).eval()
    assert seg.encode(torch.zeros(1, 3, 64, 64))[1].shape[-1] == 4  # 64 / 16


def test_pretrained_weights_load_into_the_dilated_trunk(tmp_path):
    meta = pretrain(TINY, tmp_path / "w.pt", progress=False)
    assert meta["steps"] == 3 and set(meta["held_out"]) == {"label_accuracy", "exact_accuracy"}
    assert json.loads((tmp_path / "w.json").read_text())["config_hash"] == meta["config_hash"]
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    assert "fc.weight" in saved  # the pretext head is kept in the file, dropped on load
    model = build_model(ModelCfg(backbone="resnet18", deep_stem=False, pretrained=str(tmp_path / "w.pt")), 7)
    for k, v in model.backbone.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, saved[k]), k
    with pytest.raises(RuntimeError, match="deep_stem"):  # a stem mismatch is a listed-keys error
        build_model(ModelCfg(backbone="resnet18", deep_stem=True, pretrained=str(tmp_path / "w.pt")), 7)


def test_pretext_seed_must_differ_from_the_benchmark(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["pretrain"] = {"bad": {"seed": raw["datasets"]["synthetic"]["source"]["synthetic"]["seed"]}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"pretrain\.bad\.seed"):
        load_params(tmp_path / "params.yaml")


def test_stage_keeps_unchanged_entries_and_drops_removed_ones(tmp_path, monkeypatch):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    entry = {k: v for k, v in dataclasses.asdict(TINY).items()}
    raw["pretrain"] = {"a": entry, "b": {**entry, "seed": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert main(["pretrain"]) == 0
    out = tmp_path / "data" / "pretrained"
    first = (out / "a.pt").stat().st_mtime_ns
    raw["pretrain"] = {"a": entry}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert main(["pretrain"]) == 0
    assert (out / "a.pt").stat().st_mtime_ns == first  # unchanged config: not retrained
    assert not (out / "b.pt").exists() and not (out / "b.json").exists()
    assert json.loads((out / "index.json").read_text()) == {"a": "a.pt"}


def test_relative_weights_resolve_against_the_repo_and_enter_the_fingerprint(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["studies"]["demo"]["overrides"]["model"]["pretrained"] = "w/{backbone}.pt"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    spec = study_specs(load_params(tmp_path / "params.yaml"), "demo", tmp_path)[0]
    assert spec.model.pretrained == str(tmp_path / "w" / "{backbone}.pt")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "resnet18.pt").write_bytes(b"one")
    before = fingerprint([spec])
    (tmp_path / "w" / "resnet18.pt").write_bytes(b"two")
    assert fingerprint([spec]) != before  # re-pretrained weights never reuse old results


def test_mobilenet_pretext_classifier_and_warm_start(tmp_path):
    """A CPU-sized MobileNetV3 trunk pretrains at stride 32 and loads into the stride-16 trunk."""
    cfg = dataclasses.replace(TINY, backbone="mobilenet_v3_small")
    assert classifier(cfg)(torch.zeros(2, 3, 64, 64)).shape == (2, 6)
    pretrain(cfg, tmp_path / "m.pt", progress=False)
    model = build_model(
        ModelCfg(backbone="mobilenet_v3_small", deep_stem=False, pretrained=str(tmp_path / "m.pt")), 7
    )
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.backbone.state_dict().items())
    assert model.encode(torch.zeros(1, 3, 64, 64))[1].shape[-1] == 4
