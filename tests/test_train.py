"""The training loop on a tiny embedded dataset: epochs, evaluation, checkpoint and resume."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import yaml

from pipeline.config import load_params
from pipeline.orchestrate import study_specs
from pipeline.train import Dist, fit
from tests.conftest import REPO
from tests.test_e2e_dvc import tiny_params
from tests.test_orchestrate import _prepare


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = _prepare(
        tmp_path_factory.mktemp("train"), tiny_params(yaml.safe_load((REPO / "params.yaml").read_text()))
    )
    params = load_params(root / "params.yaml")
    s = next(s for s in study_specs(params, "demo", root) if s.variant == "dssn" and s.split == "1_4")
    return dataclasses.replace(s, train=dataclasses.replace(s.train, epochs=2, iters_per_epoch=2))


def test_fit_reports_every_epoch_and_summarises(spec):
    seen = []
    summary = fit(spec, lambda e, m, s: seen.append((e, m, s)))
    assert [e for e, _, _ in seen] == [1, 2]
    assert summary["final/steps"] == 4 and summary["final/epochs"] == 2
    last = seen[-1][1]
    assert summary["final/miou_student_last"] == last["val/miou_student"]
    assert summary["final/miou_best"] == max(
        max(m["val/miou_student"], m["val/miou_teacher"]) for _, m, _ in seen
    )
    assert 0 <= last["train/mask_ratio"] <= 1 and "pseudo_kept/disc" in last
    # pseudo-label statistics by source: the teacher's image-level maps beside the student's weak view
    assert 0 <= last["train/mask_ratio_teacher"] <= 1 and "pseudo_kept_teacher/disc" in last


def test_resume_mid_run_and_after_the_last_epoch(spec):
    states = []
    full = fit(spec, lambda e, m, s: states.append(copy.deepcopy(s)))  # as saved to disk: live tensors
    resumed = []
    out = fit(spec, lambda e, m, s: resumed.append(e), resume=states[0])
    assert resumed == [2] and out["final/steps"] == 4  # continued from epoch 1, did not restart
    # bit-exact: the resumed trial ends where the uninterrupted one did (RNG state is checkpointed)
    for a, b in zip(
        full["_student"].state_dict().values(), out["_student"].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    done = fit(spec, None, resume=states[-1])  # killed after its last epoch: nothing left to train
    assert done["final/miou_student_last"] == full["final/miou_student_last"]
    assert done["final/steps"] == 4


def test_oracle_pseudo_labels_through_the_loop(spec):
    """Ground truth as pseudo-labels: every non-ignored pixel kept, all of them correct."""
    oracle = dataclasses.replace(spec, method=dataclasses.replace(spec.method, oracle_pseudo_labels=True))
    seen = []
    fit(
        dataclasses.replace(oracle, train=dataclasses.replace(spec.train, epochs=1)),
        lambda e, m, s: seen.append(m),
    )
    m = seen[-1]
    assert m["train/pl_accuracy"] == 1.0
    kept = [v for k, v in m.items() if k.startswith("pseudo_kept/") and v == v]  # NaN: class not present
    assert kept and all(v == pytest.approx(1.0) for v in kept)
    # the teacher's image-level targets (composited with the CutMix partner) are the composited truth
    assert m["train/pl_accuracy_teacher"] == 1.0 and m["train/mask_ratio_teacher"] == 1.0
    kept_t = [v for k, v in m.items() if k.startswith("pseudo_kept_teacher/") and v == v]
    assert len(kept_t) >= 3 and all(v == pytest.approx(1.0) for v in kept_t)


def test_warmup_epoch_trains_on_labels_only(spec):
    warm = dataclasses.replace(spec, method=dataclasses.replace(spec.method, warmup_epochs=1))
    seen = []
    summary = fit(warm, lambda e, m, s: seen.append(m))
    first, second = seen
    assert "train/loss_s" not in first and "train/mask_ratio" not in first
    assert first["train/pl_accuracy"] != first["train/pl_accuracy"]  # NaN: no pseudo-labels yet
    assert "train/loss_s" in second and 0 <= second["train/mask_ratio"] <= 1
    assert summary["final/steps"] == 4
    with pytest.raises(ValueError, match=r"warmup_epochs \(2\) must be below train.epochs \(2\)"):
        fit(dataclasses.replace(spec, method=dataclasses.replace(spec.method, warmup_epochs=2)))


def test_adaptive_thresholds_and_alignment_are_logged_and_resumed(spec):
    """`selection: adaptive` and `pl_align` keep state across steps: logged per class each epoch and
    saved in the checkpoint, so a resumed trial continues with the same state (bit-exact)."""
    ada = dataclasses.replace(
        spec,
        method=dataclasses.replace(
            spec.method, selection="adaptive", adaptive_momentum=0.5, pl_align=True, pl_align_momentum=0.5
        ),
    )
    seen, states = [], []
    full = fit(ada, lambda e, m, s: (seen.append(m), states.append(copy.deepcopy(s))))
    th = [{k: v for k, v in m.items() if k.startswith("pl_threshold/")} for m in seen]
    assert len(th[0]) == len(spec.class_names) and all(0 < v <= 1 for v in th[0].values())
    assert th[0] != th[1] and max(th[1].values()) != pytest.approx(1 / len(spec.class_names))
    al = [{k: v for k, v in m.items() if k.startswith("pl_align/")} for m in seen]
    assert len(al[0]) == len(spec.class_names) and al[0] != al[1]
    assert states[0]["adaptive"] is not None and states[0]["align"] is not None
    resumed = []
    out = fit(ada, lambda e, m, s: resumed.append(m), resume=states[0])
    assert {k: v for k, v in resumed[0].items() if k.startswith("pl_threshold/")} == th[1]
    assert {k: v for k, v in resumed[0].items() if k.startswith("pl_align/")} == al[1]
    for a, b in zip(
        full["_student"].state_dict().values(), out["_student"].state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_supervised_ref_epoch_is_one_pass_over_the_labeled_list(spec):
    """The reference supervised.py: labeled images only, an epoch = len(labeled) // batch steps
    (the semi-supervised loop repeats the labeled list to the unlabeled list's length instead)."""
    from pathlib import Path

    from pipeline.config import method_for_variant
    from pipeline.data.splits import read_list

    n_lab = len(read_list(Path(spec.split_dir) / spec.split / "labeled.txt"))
    n_unl = len(read_list(Path(spec.split_dir) / spec.split / "unlabeled.txt"))
    train = dataclasses.replace(spec.train, epochs=1, iters_per_epoch=None, eval_every=1)
    ref = dataclasses.replace(
        spec, variant="supervised_ref", train=train, method=method_for_variant(spec.method, "supervised_ref")
    )
    assert n_lab // train.batch_l != n_unl // train.batch_u  # the two rules differ on this split
    assert fit(ref)["final/steps"] == n_lab // train.batch_l
    too_big = dataclasses.replace(ref, train=dataclasses.replace(train, batch_l=n_lab + 1))
    with pytest.raises(ValueError, match=r"labeled.txt \(\d+ items\) with train.batch_l \d+"):
        fit(too_big)


def test_an_empty_loader_is_an_error_not_a_busy_loop():
    from torch.utils.data import DataLoader

    from pipeline.train import _cycle

    it = _cycle(DataLoader(list(range(3)), batch_size=4, drop_last=True))
    with pytest.raises(RuntimeError, match="yielded no batch: 3 items, batch 4"):
        next(it)


def test_ohem_chunk_must_divide_each_workers_batch():
    s = study_specs(load_params(REPO / "params.yaml"), "demo", REPO)[0]
    train = dataclasses.replace(s.train, sup_loss="ohem", batch_l=4, batch_u=4, ohem_chunk=4)
    with pytest.raises(ValueError, match=r"train.ohem_chunk \(4\) must divide each worker's labeled batch"):
        fit(dataclasses.replace(s, train=train), dist=Dist(rank=0, world=2), device=torch.device("cpu"))


def test_flush_denormal_is_set_per_trial(spec):
    """`train.flush_denormal` (CPU): denormal floats flush to zero inside the trial's process, and a
    later trial without it (Ray reuses worker processes) computes in IEEE arithmetic again."""

    def denormal() -> float:
        return (torch.tensor([1e-39], dtype=torch.float32) * 1.0).item()

    fit(dataclasses.replace(spec, train=dataclasses.replace(spec.train, flush_denormal=True)))
    assert denormal() == 0.0
    fit(dataclasses.replace(spec, train=dataclasses.replace(spec.train, flush_denormal=False)))
    assert denormal() != 0.0
