"""The GPU fast path, compiled and in bf16, run on a CPU (`train.fast_path_on_cpu`).

One compiled Trainer (inductor's C++ backend, bf16 autocast, channels-last; student and teacher
compiled) and one fp32 eager Trainer start from the same weights and take the same steps: the first
semi-supervised iteration (teacher copy, strong CE off), later ones (EMA), a new batch and new
CutMix boxes every step, a lowered CPLG gate (so keep ratios > 0 that vary), then the teacher in eval
mode as from the second semi epoch on. A third Trainer, bf16 eager, separates compile from bf16.
Compiling costs minutes on 2 cores, so the steps run once (module fixture) and the tests read what
they recorded. What a GPU adds (speed, CUDA kernels) is `make gpu-check`'s job.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from pipeline.config import MethodCfg, TrainCfg
from pipeline.train import Trainer, _loader
from tests.test_step import MODEL, batch

pytestmark = pytest.mark.slow

STEPS = 6  # iterations 0..5
LOOSE_GATE_FROM = 3  # CPLG gate lowered from here, so pixels are kept (random init: none at tau_low 0.92)
TEACHER_EVAL_FROM = 4  # the teacher's BN in eval mode, as from the second semi-supervised epoch on
# Tolerances. bf16 vs fp32 on a random-init ResNet-18 at 32 px: measured loss differences <= 1.5 %,
# gradient cosine 0.81-0.90 on the first step (eager bf16 too: near-uniform logits and BN over 1x1
# maps make bf16 rounding visible), so the gradient bound only says "the same direction".
LOSS_RTOL_FIRST, LOSS_RTOL, GRAD_COSINE_FIRST = 0.01, 0.05, 0.5
# the graphs the step needs, and no more: student with feature-dropout views (labeled + weak),
# student plain (strong views), teacher in train-mode BN (first semi epoch), teacher in eval mode
EXPECTED_GRAPHS = 4


def _grads(tr: Trainer) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().reshape(-1) for p in tr.student.parameters()])


def _cos(a: Trainer, b: Trainer) -> float:
    return float(torch.nn.functional.cosine_similarity(_grads(a), _grads(b), dim=0))


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    import torch._inductor.config as inductor_config

    cache_env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))  # cold, and not /tmp
    fallback_random = inductor_config.fallback_random
    inductor_config.fallback_random = True  # eager's RNG in compiled graphs: the same dropout masks
    torch._dynamo.reset()
    counters.clear()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    base = TrainCfg(crop=32, batch_l=2, batch_u=2, optimizer="sgd", lr=0.01)
    fast = Trainer(MODEL, dataclasses.replace(base, fast_path_on_cpu=True), MethodCfg(), 4, cpu)
    bf16 = Trainer(
        MODEL, dataclasses.replace(base, fast_path_on_cpu=True, compile=False), MethodCfg(), 4, cpu
    )
    ref = Trainer(MODEL, base, MethodCfg(), 4, cpu)
    trainers = {"fast": fast, "bf16": bf16, "ref": ref}
    for tr in (bf16, ref):
        tr.student.load_state_dict(fast.student.state_dict())
        tr.teacher.load_state_dict(fast.teacher.state_dict())
    rec: dict = {k: [] for k in ("fast", "bf16", "ref", "mask_fast", "cos_ref", "cos_bf16")}
    for it in range(STEPS):
        b = batch(seed=it)
        for name, tr in trainers.items():
            if it == LOOSE_GATE_FROM:
                tr.mcfg = dataclasses.replace(tr.mcfg, tau_low=0.25, r=0.8)
            if it == TEACHER_EVAL_FROM:
                tr.teacher.eval()
            torch.manual_seed(1000 + it)  # the same dropout draws in every trainer
            loss, stats = tr.step(b, torch.Generator().manual_seed(it), it, 100, 0, 2)
            rec[name].append(float(loss))
            if name == "fast":
                rec["mask_fast"].append(float(stats["mask_ratio"]))
        rec["cos_ref"].append(_cos(fast, ref))
        rec["cos_bf16"].append(_cos(fast, bf16))
    rec["compiled"] = fast.compiled
    rec["graphs"] = counters["stats"]["unique_graphs"]
    rec["frames"] = dict(counters["frames"])
    rec["breaks"] = dict(counters["graph_break"])
    rec["params_finite"] = all(torch.isfinite(p).all() for p in fast.student.parameters())
    print(f"\ncompiled fast path on CPU: {rec}")
    yield rec
    torch._dynamo.reset()
    inductor_config.fallback_random = fallback_random
    if cache_env is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_env


def test_compiled_bf16_step_trains_and_stays_compiled(steps):
    assert steps["compiled"]  # no fallback to eager happened
    assert steps["params_finite"] and all(torch.isfinite(torch.tensor(steps["fast"])))
    masks = steps["mask_fast"]
    assert masks[:LOOSE_GATE_FROM] == [0.0] * LOOSE_GATE_FROM  # CPLG's gate closed at random init
    assert all(0 < m < 1 for m in masks[LOOSE_GATE_FROM:]) and len(set(masks)) > 2  # keep ratios vary


def test_loss_and_gradients_match_fp32_eager(steps):
    f, r, e = steps["fast"], steps["ref"], steps["bf16"]
    assert f[0] == pytest.approx(r[0], rel=LOSS_RTOL_FIRST)  # identical weights and inputs
    for a, b, c in zip(f, r, e, strict=True):
        assert a == pytest.approx(b, rel=LOSS_RTOL) and a == pytest.approx(c, rel=LOSS_RTOL)
    assert steps["cos_ref"][0] > GRAD_COSINE_FIRST and steps["cos_bf16"][0] > GRAD_COSINE_FIRST, steps


def test_compiles_are_bounded_and_nothing_breaks_the_graphs(steps):
    # iterations, CutMix boxes, keep ratios, gate settings and EMA keep change: none recompiles
    assert steps["graphs"] == EXPECTED_GRAPHS, steps
    assert steps["breaks"] == {}, steps["breaks"]
    assert steps["frames"].get("total") == steps["frames"].get("ok") == EXPECTED_GRAPHS


def test_training_batches_are_never_partial():
    """The last partial batch is dropped (drop_last), so the compiled step sees one shape per run."""
    ds = list(range(5))
    loader = _loader(ds, 2, 0, TrainCfg(), torch.device("cpu"))
    assert loader.drop_last and [len(b) for b in loader] == [2, 2]
