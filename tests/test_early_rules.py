"""The early-training rules of the three released regimes (dssn-method.md §4.3), hand-worked, and
configs/paper.yaml choosing them per backbone as the released logs show."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import ConfigError, MethodCfg, load_params
from pipeline.orchestrate import study_specs
from pipeline.train import Trainer, early_rules
from tests.conftest import REPO
from tests.test_step import MODEL, TRAIN, batch

VOC = MethodCfg()  # the released VOC code
CITY_CODE = MethodCfg(teacher_copy_epochs=5, strong_off_epochs=5)  # city/DSSN.py, the R101 logs
CITY_R50_LOGS = MethodCfg(teacher_copy_epochs=1, skip_strong_first_iter=False)  # the R50 logs
K = 0.996


@pytest.mark.parametrize(
    ("cfg", "iteration", "semi_start", "expected"),
    [
        # VOC: iteration 0 has no strong CE and ends with a hard copy; EMA from iteration 1 on
        (VOC, 0, 0, (True, 0.0)),
        (VOC, 1, 0, (False, K)),
        (VOC, 10, 0, (False, K)),
        # city code at 10 steps/epoch: epochs 0-4 = iterations 0-49 copy + no strong CE
        (CITY_CODE, 0, 0, (True, 0.0)),
        (CITY_CODE, 49, 0, (True, 0.0)),
        (CITY_CODE, 50, 0, (False, K)),
        # R50 logs: strong CE from iteration 0, copy through epoch 0 (iterations 0-9)
        (CITY_R50_LOGS, 0, 0, (False, 0.0)),
        (CITY_R50_LOGS, 9, 0, (False, 0.0)),
        (CITY_R50_LOGS, 10, 0, (False, K)),
        # after a 2-epoch warm-up (semi_start 20) every rule moves with it; warm-up steps copy
        (VOC, 5, 20, (True, 0.0)),  # warm-up: labeled only, nothing strong to train
        (VOC, 20, 20, (True, 0.0)),
        (VOC, 21, 20, (False, K)),
        (CITY_CODE, 69, 20, (True, 0.0)),
        (CITY_CODE, 70, 20, (False, K)),
    ],
)
def test_early_rules_hand_worked(cfg, iteration, semi_start, expected):
    assert early_rules(cfg, iteration, semi_start, epoch_iters=10) == expected


def _same(a, b) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_city_code_rule_copies_the_teacher_and_drops_strong_ce_through_the_trainer():
    torch.manual_seed(0)
    keep_all = dict(selection="fixed", threshold=0.0)  # every pixel kept: loss_s > 0 whenever it is on
    tr = Trainer(MODEL, TRAIN, dataclasses.replace(CITY_CODE, **keep_all), 4, torch.device("cpu"))
    for it in (0, 7, 19):  # epochs 0-1 of 10-step epochs
        _, stats = tr.step(batch(seed=it), torch.Generator().manual_seed(it), it, 100, 0, epoch_iters=4)
        assert float(stats["loss_s"]) == 0.0
        assert _same(tr.teacher, tr.student)
    _, stats = tr.step(batch(seed=9), torch.Generator().manual_seed(9), 20, 100, 0, epoch_iters=4)
    assert float(stats["loss_s"]) > 0.0 and not _same(tr.teacher, tr.student)

    tr = Trainer(MODEL, TRAIN, dataclasses.replace(CITY_R50_LOGS, **keep_all), 4, torch.device("cpu"))
    _, stats = tr.step(batch(), torch.Generator().manual_seed(0), 0, 100, 0, epoch_iters=4)
    assert float(stats["loss_s"]) > 0.0 and _same(tr.teacher, tr.student)
    tr.step(batch(seed=1), torch.Generator().manual_seed(1), 4, 100, 0, epoch_iters=4)
    assert not _same(tr.teacher, tr.student)


def test_paper_config_picks_the_rule_and_ohem_of_each_backbone(tmp_path):
    """Table 3 / Fig. 3: R101 cells follow the released city code, R50 cells the R50 logs' rule;
    the VOC tables keep the VOC rule."""
    params = load_params(REPO / "configs" / "paper.yaml")
    rules = {}
    for study in ("table3", "fig3", "table2"):
        for s in study_specs(params, study, tmp_path):
            if s.variant == "dssn":
                m = s.method
                rules[(study, s.model.backbone)] = (
                    m.teacher_copy_epochs,
                    m.strong_off_epochs,
                    m.skip_strong_first_iter,
                )
    assert rules[("table3", "resnet101")] == (5, 5, True)
    assert rules[("table3", "resnet50")] == (1, 0, False)
    assert rules[("fig3", "resnet50")] == (1, 0, False)
    assert rules[("table2", "resnet50")] == rules[("table2", "resnet101")] == (0, 0, True)


def _write(tmp_path, text: str):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


BASE = (REPO / "params.yaml").read_text()


def test_backbone_overrides_are_checked(tmp_path):
    import yaml

    raw = yaml.safe_load(BASE)
    study = next(iter(raw["studies"].values()))
    study["backbones"] = ["resnet18"]
    study["backbone_overrides"] = {"resnet101": {"method": {"teacher_copy_epochs": 1}}}
    with pytest.raises(ConfigError, match=r"backbone_overrides\.resnet101` names a backbone the study"):
        load_params(_write(tmp_path, yaml.safe_dump(raw)))
    study["backbone_overrides"] = {"resnet18": {"method": {"strong_off_epochs": 10_000}}}
    with pytest.raises(ConfigError, match="EMA teacher never starts"):
        load_params(_write(tmp_path, yaml.safe_dump(raw)))
    study["backbone_overrides"] = {"resnet18": {"method": {"strong_off_epochs": -1}}}
    with pytest.raises(ConfigError, match=r"strong_off_epochs` must be an integer >= 0"):
        load_params(_write(tmp_path, yaml.safe_dump(raw)))
