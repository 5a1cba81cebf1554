"""The DSSN step: every variant runs one real optimisation step on CPU; the teacher gets no gradient."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pipeline.config import VARIANTS, MethodCfg, ModelCfg, TrainCfg, method_for_variant
from pipeline.data.transforms import normalize
from pipeline.method.align import DistributionAlignment
from pipeline.method.cplg import AdaptiveThresholds
from pipeline.method.dssn import Batch, dssn_step
from pipeline.method.losses import supervised_ce
from pipeline.train import Trainer

MODEL = ModelCfg(backbone="resnet18", deep_stem=False, aspp_channels=16, skip_channels=8, decoder_channels=16)
TRAIN = TrainCfg(crop=32, batch_l=2, batch_u=2, optimizer="sgd", lr=0.01)


def batch(n: int = 2, size: int = 32, classes: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)  # noqa: E731
    ign = torch.zeros(n, size, size, dtype=torch.bool)
    ign[:, -4:] = True
    return Batch(
        x=img(),
        y=torch.randint(0, classes, (n, size, size), generator=g),
        u=img(),
        u_ign=ign,
        m=img(),
        m_ign=ign.clone(),
    )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_step_of_every_variant(variant):
    torch.manual_seed(0)
    mcfg = method_for_variant(MethodCfg(), variant)
    tr = Trainer(MODEL, TRAIN, mcfg, 4, torch.device("cpu"))
    before = [p.detach().clone() for p in tr.student.parameters()]
    loss, stats = tr.step(batch(), torch.Generator().manual_seed(0), iteration=3, total=10)
    assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.student.parameters(), strict=True))
    assert (tr.teacher is not None) == (variant not in ("supervised", "supervised_ref", "unimatch"))
    if mcfg.use_unlabeled:
        assert 0.0 <= float(stats["mask_ratio"]) <= 1.0
        assert (float(stats["loss_con_img"]) > 0) == mcfg.con_img
        assert (float(stats["loss_con_feat"]) > 0) == (mcfg.con_feat and mcfg.n_fp == 2)
    # poly LR was set for the next step: lr0 * (1 - 4/10)^0.9
    assert tr.opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.6**0.9)


def test_teacher_receives_no_gradient_and_follows_ema():
    torch.manual_seed(0)
    tr = Trainer(MODEL, TRAIN, MethodCfg(), 4, torch.device("cpu"))
    tr.step(batch(), torch.Generator().manual_seed(0), iteration=0, total=10)
    assert all(p.grad is None and not p.requires_grad for p in tr.teacher.parameters())
    # iteration 0: hard copy of the student (keep = 0)
    for t, s in zip(tr.teacher.parameters(), tr.student.parameters(), strict=True):
        assert torch.equal(t, s)
    t_before = [p.clone() for p in tr.teacher.parameters()]
    tr.step(batch(seed=1), torch.Generator().manual_seed(1), iteration=1, total=10)
    for t, t0, s in zip(tr.teacher.parameters(), t_before, tr.student.parameters(), strict=True):
        assert torch.allclose(t, 0.996 * t0 + 0.004 * s, atol=1e-6)


def test_warmup_steps_are_labeled_only_and_the_teacher_starts_from_the_warmed_student():
    """method.warmup_epochs: labeled-only steps before `semi_start`; the teacher is a hard copy of
    the student until the first semi step has run, then follows the EMA."""
    torch.manual_seed(0)
    tr = Trainer(MODEL, TRAIN, MethodCfg(warmup_epochs=1), 4, torch.device("cpu"))
    sup = dataclasses.replace(batch(), u=None, u_ign=None, m=None, m_ign=None)
    for it in range(2):
        _, stats = tr.step(sup, torch.Generator().manual_seed(it), iteration=it, total=10, semi_start=2)
        assert set(stats) == {"loss_x"}
        for t, s in zip(tr.teacher.state_dict().values(), tr.student.state_dict().values(), strict=True):
            assert torch.equal(t, s)
    _, stats = tr.step(batch(), torch.Generator().manual_seed(2), iteration=2, total=10, semi_start=2)
    assert float(stats["loss_s"]) == 0.0  # the reference's first-iteration rule moves to semi_start
    for t, s in zip(tr.teacher.parameters(), tr.student.parameters(), strict=True):
        assert torch.equal(t, s)
    t_before = [p.clone() for p in tr.teacher.parameters()]
    _, stats = tr.step(batch(seed=1), torch.Generator().manual_seed(3), iteration=3, total=10, semi_start=2)
    for t, t0, s in zip(tr.teacher.parameters(), t_before, tr.student.parameters(), strict=True):
        assert torch.allclose(t, 0.996 * t0 + 0.004 * s, atol=1e-6)
    assert "mask_ratio" in stats


def test_selection_balance_reweights_only_the_pseudo_label_terms():
    torch.manual_seed(0)
    tr = Trainer(MODEL, TRAIN, MethodCfg(), 4, torch.device("cpu"))
    plain = MethodCfg(selection="fixed", threshold=0.3)  # a random model: some pixels pass
    balanced = dataclasses.replace(plain, pl_balance="selection")
    out = {}
    for name, cfg in (("plain", plain), ("balanced", balanced)):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(1)  # the same dropout draws
        _, out[name] = dssn_step(tr.student, tr.teacher, batch(), cfg, supervised_ce, gen)
    a, b = out["plain"], out["balanced"]
    for k in ("loss_x", "loss_con_img", "loss_con_feat", "mask_ratio"):
        assert torch.equal(a[k], b[k]), k
    assert 0 < float(a["mask_ratio"]) < 1
    assert float(a["loss_s"]) != pytest.approx(float(b["loss_s"]), rel=1e-4)
    assert float(a["loss_fp"]) != pytest.approx(float(b["loss_fp"]), rel=1e-4)


def test_first_iteration_drops_the_strong_view_loss():
    torch.manual_seed(0)
    tr = Trainer(MODEL, TRAIN, MethodCfg(), 4, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    _, first = dssn_step(tr.student, tr.teacher, batch(), MethodCfg(), supervised_ce, gen, strong_off=True)
    assert float(first["loss_s"]) == 0.0
    gen = torch.Generator().manual_seed(0)
    cfg = dataclasses.replace(MethodCfg(), selection="fixed", threshold=0.0)  # keep every pixel
    _, later = dssn_step(tr.student, tr.teacher, batch(), cfg, supervised_ce, gen, strong_off=False)
    assert float(later["loss_s"]) > 0.0


def test_total_loss_combines_terms_with_the_code_weights():
    torch.manual_seed(0)
    tr = Trainer(MODEL, TRAIN, MethodCfg(), 4, torch.device("cpu"))
    cfg = dataclasses.replace(MethodCfg(), selection="fixed", threshold=0.0)
    loss, st = dssn_step(
        tr.student, tr.teacher, batch(), cfg, supervised_ce, torch.Generator().manual_seed(0)
    )
    expected = 0.5 * (
        st["loss_x"]
        + 0.25 * st["loss_s"]
        + 0.25 * st["loss_fp"]
        + 0.01 * (st["loss_con_img"] + st["loss_con_feat"])
    )
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_oracle_pseudo_labels_are_the_ground_truth_whatever_the_teacher():
    g = torch.Generator().manual_seed(5)
    gt_u, gt_m = (torch.randint(0, 4, (2, 32, 32), generator=g) for _ in range(2))
    gt_u[:, :3], gt_m[:, :, :5] = 255, 255  # ignore bands (object borders / padding)
    b = dataclasses.replace(batch(), u_gt=gt_u, m_gt=gt_m)
    torch.manual_seed(0)
    tr = Trainer(MODEL, TRAIN, MethodCfg(), 4, torch.device("cpu"))
    other = copy.deepcopy(tr.teacher)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5 * torch.randn_like(p))

    def run(teacher, oracle):
        cfg = dataclasses.replace(MethodCfg(), oracle_pseudo_labels=oracle, selection="fixed", threshold=0.0)
        torch.manual_seed(1)  # same dropout draws in both calls
        return dssn_step(tr.student, teacher, b, cfg, supervised_ce, torch.Generator().manual_seed(0))[1]

    a, c = run(tr.teacher, True), run(other, True)
    assert float(a["loss_s"]) == pytest.approx(float(c["loss_s"]), rel=1e-6)
    assert torch.equal(a["pl_labels"], gt_u)
    valid = ~b.u_ign
    assert float(a["mask_ratio"]) == pytest.approx(float(((gt_u != 255) & valid).sum() / valid.sum()))
    # without the oracle the two teachers' pseudo-labels, hence the strong-view losses, differ
    assert float(run(tr.teacher, False)["loss_s"]) != pytest.approx(
        float(run(other, False)["loss_s"]), rel=1e-3
    )
    with pytest.raises(ValueError, match="oracle_pseudo_labels"):
        dssn_step(
            tr.student,
            tr.teacher,
            batch(),
            dataclasses.replace(MethodCfg(), oracle_pseudo_labels=True),
            supervised_ce,
            torch.Generator().manual_seed(0),
        )


def _teacher_maps(cfg: MethodCfg) -> tuple[Trainer, Batch, torch.Tensor, torch.Tensor]:
    """A trainer (eval-mode teacher), a batch, and the teacher's softmax maps of u and m with their
    valid pixels, computed here outside the step."""
    torch.manual_seed(0)
    tr = Trainer(MODEL, TRAIN, cfg, 4, torch.device("cpu"))
    tr.teacher.eval()
    b = batch()
    with torch.no_grad():
        prob = torch.cat([tr.teacher(normalize(b.u.float() / 255)), tr.teacher(normalize(b.m.float() / 255))])
    return tr, b, prob.softmax(1), ~torch.cat([b.u_ign, b.m_ign])


def test_adaptive_selection_learns_from_the_teachers_maps_of_both_unlabeled_batches():
    """momentum 0: after one step the state is this batch's statistics, recomputed here from the
    teacher's own maps of u and m; without its state the step refuses to run."""
    cfg = MethodCfg(selection="adaptive", adaptive_momentum=0.0)
    tr, b, prob, valid = _teacher_maps(cfg)
    conf, labels = prob.max(1)
    state = AdaptiveThresholds(4, momentum=0.0)
    _, stats = dssn_step(tr.student, tr.teacher, b, cfg, supervised_ce, torch.Generator(), adaptive=state)
    assert float(state.g) == pytest.approx(float(conf[valid].mean()), rel=1e-5)
    for j in range(4):
        sel = valid & (labels == j)
        expected = float(conf[sel].mean()) if sel.any() else 0.25
        assert float(state.c[j]) == pytest.approx(expected, rel=1e-5), j
    assert 0 < float(stats["mask_ratio"]) < 1  # thresholds below the max confidence: some pass
    with pytest.raises(ValueError, match="adaptive"):
        dssn_step(tr.student, tr.teacher, b, cfg, supervised_ce, torch.Generator())


def test_distribution_alignment_learns_from_labels_and_teacher():
    """momentum 0: the state is this step's labeled class frequencies and the teacher's mean
    probabilities over the valid pixels of u and m."""
    cfg = MethodCfg(selection="fixed", threshold=0.3, pl_align=True, pl_align_momentum=0.0)
    tr, b, prob, valid = _teacher_maps(cfg)
    state = DistributionAlignment(4, momentum=0.0)
    dssn_step(tr.student, tr.teacher, b, cfg, supervised_ce, torch.Generator(), align=state)
    assert torch.allclose(state.pred, prob.permute(0, 2, 3, 1)[valid].mean(0), atol=1e-5)
    assert torch.allclose(state.prior, torch.bincount(b.y.flatten(), minlength=4).float() / b.y.numel())
    with pytest.raises(ValueError, match="pl_align"):
        dssn_step(tr.student, tr.teacher, b, cfg, supervised_ce, torch.Generator())
