"""One command for the day a GPU is lent: what the GPU path needs measured, as one JSON summary.

    make gpu-check                              # a CUDA machine: sized for <= 8 min on one H100/H200
    python bench/gpu_check.py --cpu-smoke       # anywhere: tiny sizes, the harness end to end (CI)

Sections, in order, each with its own seconds; one that would start after `--budget-s` is
skipped and says so, a failing one records its error and the rest still run:
  info      device(s), torch/CUDA/cuDNN/Python versions
  gpu_tests the `@gpu` tests (pytest -m gpu tests/method): CUDA vs CPU on the same inputs
  bench     bench/step.py at the paper's VOC setting (ResNet-101, crop 513, batch 8 + 8, 8 loader
            workers): fp32 eager vs the fast path, images/s, peak memory, TFLOP/s, loader images/s
  fit       a short real DSSN run through `fit` on synthetic 513-px data, fast path and fp32 from the
            same seed, with the per-epoch train-loss agreement and the final val mIoU of both
  ddp       one DDP trial step (2 workers, 4 + 4 each) through Ray Train when two GPUs exist
            (`--ddp-cpu`: 2 gloo CPU workers, the harness only)

--cpu-smoke: bench --quick, a 2 x 2-step fit on 48-px data with a ResNet-18, whose "fast" arm is
bf16 autocast + channels-last on the CPU (`train.fast_path_on_cpu`) without compile (compiling is
tested by tests/test_fastpath_compiled.py; add --cpu-compile to compile here too).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/gpu_check.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench import step as bench_step  # noqa: E402
from pipeline.config import DatasetCfg, MethodCfg, ModelCfg, TrainCfg  # noqa: E402
from pipeline.train import Trainer, TrialSpec, fit  # noqa: E402

TINY = ModelCfg(backbone="resnet18", deep_stem=False, aspp_channels=16, skip_channels=8, decoder_channels=16)
PAPER = ModelCfg(backbone="resnet101", deep_stem=True)  # no pretrained weights: the GPU box is offline


SECTIONS = ["info", "gpu_tests", "bench", "fit", "ddp"]


class OutOfTime(Exception):
    """A fit arm stopped at an epoch boundary because the check's budget was spent."""


def info() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "python": sys.version.split()[0],
        "cpu_threads": torch.get_num_threads(),
    }


def gpu_tests(tmp: Path) -> dict[str, Any]:
    """The `@gpu` tests; on a CPU every one of them is skipped (their CPU-fast-path twins run in CI)."""
    xml = tmp / "gpu_tests.xml"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={xml}"]
        + ["tests/method"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    n["exit_code"] = res.returncode  # 0 = passed; 5 = nothing selected/ran
    if n["failures"] or n["errors"]:
        n["output_tail"] = res.stdout[-3000:]
    return n


def bench(args, tmp: Path) -> dict[str, Any]:
    out = tmp / "step.json"
    argv = ["--out", str(out)]
    if args.cpu_smoke:
        argv += ["--quick"] + (["--cpu-fast"] if args.cpu_compile else [])
    else:
        argv += ["--backbone", "resnet101", "--crop", "513", "--batch", "8", "--workers", "8"]
    bench_step.main(argv)
    return json.loads(out.read_text())


def _dataset(tmp: Path, size: int, n_train: int, n_val: int) -> tuple[Path, Path]:
    from pipeline.data.prepare import prepare_voc
    from pipeline.data.splits import make_splits
    from pipeline.data.synthetic import generate

    generate(tmp / "raw", n_train=n_train, n_val=n_val, size=size, seed=0)
    prepare_voc(tmp / "raw", tmp / "prepared", num_classes=7)
    make_splits(tmp / "prepared" / "lists", tmp / "splits", "blended", ["1_4"])
    return tmp / "prepared", tmp / "splits"


def fit_agreement(args, tmp: Path, deadline: float) -> dict[str, Any]:
    """The same trial (seed, data, init) through `fit` with the fast path and in fp32 eager."""
    from pipeline.data.synthetic import CLASSES

    torch._dynamo.reset()  # the benchmark's graphs must not count towards the recompile limit
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    smoke = args.cpu_smoke
    root, splits = _dataset(tmp, 48 if smoke else 513, 16 if smoke else 64, 2 if smoke else 4)
    epochs, iters = (2, 2) if smoke else (args.fit_epochs, args.fit_iters)
    train = TrainCfg(
        epochs=epochs,
        iters_per_epoch=iters,
        batch_l=2 if smoke else 8,
        batch_u=2 if smoke else 8,
        crop=32 if smoke else 513,
        eval_every=epochs,
        threads=torch.get_num_threads(),
        workers=0 if smoke else 8,
        log_images=0,
    )
    spec = TrialSpec(
        study="gpu_check",
        cell="fit",
        dataset_name="synthetic",
        dataset=DatasetCfg(kind="voc", num_classes=len(CLASSES)),
        class_names=list(CLASSES),
        root=str(root),
        split_dir=str(splits),
        split="1_4",
        protocol="blended",
        variant="dssn",
        seed=0,
        model=TINY if smoke else PAPER,
        train=train,
        method=MethodCfg(),
    )
    arms = {
        "fast": {"amp": True, "channels_last": True, "compile": not smoke or args.cpu_compile},
        "fp32": {"amp": False, "channels_last": False, "compile": False},
    }
    out: dict[str, Any] = {
        "steps_planned": epochs * iters,
        "crop": train.crop,
        "batch": "8+8" if not smoke else "2+2",
    }
    for name, switches in arms.items():
        arm = dataclasses.replace(spec, train=dataclasses.replace(train, fast_path_on_cpu=smoke, **switches))
        losses: list[float] = []

        def on_epoch(epoch: int, m: dict, _state: dict, losses=losses) -> None:
            losses.append(m["train/loss"])
            if time.monotonic() > deadline and epoch < epochs:
                raise OutOfTime

        t0 = time.perf_counter()
        try:
            summary = fit(arm, on_epoch)
            miou = summary.get("final/miou_best")
        except OutOfTime:
            miou = None
        out[name] = {
            "seconds": time.perf_counter() - t0,
            "epoch_train_loss": losses,
            "steps": len(losses) * iters,
            "val_miou_best": miou,
            **switches,
        }
    common = min(len(out["fast"]["epoch_train_loss"]), len(out["fp32"]["epoch_train_loss"]))
    rel = [
        abs(a - b) / max(abs(b), 1e-12)
        for a, b in zip(
            out["fast"]["epoch_train_loss"][:common], out["fp32"]["epoch_train_loss"][:common], strict=True
        )
    ]
    out["loss_max_rel_diff"] = max(rel) if rel else None
    # bf16 over hundreds of steps drifts; the mean epoch loss within 10 % is the agreement criterion
    out["loss_agree"] = bool(rel) and all(math.isfinite(r) and r < 0.10 for r in rel)
    return out


def _ddp_worker(config: dict) -> None:
    """One Ray Train rank: a few full DSSN steps of the DDP Trainer; rank 0 reports the sync check."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(0)  # the same init on every rank, as fit does
    model = ModelCfg(**config["model"])
    train = TrainCfg(crop=config["crop"], batch_l=config["batch"], batch_u=config["batch"])
    tr = Trainer(model, train, MethodCfg(), 21, device, ddp=True)
    g = torch.Generator().manual_seed(rank)
    b = bench_step.random_batch(config["batch"], config["batch"], config["crop"], 21, device, g)
    gen = torch.Generator().manual_seed(rank)
    times = []
    for i in range(config["steps"]):
        t0 = time.perf_counter()
        loss, _ = tr.step(b, gen, i, config["steps"] + 10)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    digest = float(sum(p.detach().double().sum() for p in tr.student.parameters()))
    digests: list = [None] * world
    torch.distributed.all_gather_object(digests, digest)
    if rank == 0:  # a file on this machine: Ray Train keeps a report's metrics only with a checkpoint
        Path(config["out"]).write_text(
            json.dumps(
                {
                    "world": world,
                    "device": str(device),
                    "loss": float(loss),
                    "first_step_s": times[0],
                    "step_s": sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else None,
                    "compiled": tr.compiled,
                    "params_in_sync": all(d == digests[0] for d in digests),
                }
            )
        )


def ddp(args, tmp: Path) -> dict[str, Any]:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    gpu = not args.ddp_cpu
    model = TINY if args.ddp_cpu else PAPER
    config = {
        "model": dataclasses.asdict(model),
        "crop": 32 if args.ddp_cpu else 513,
        "batch": 2 if args.ddp_cpu else 4,  # per worker: the paper's global 8 + 8 over 2 GPUs
        "steps": 3 if args.ddp_cpu else 6,
        "out": str(tmp / "ddp.json"),
    }
    # a cluster of its own on this machine, whatever RAY_ADDRESS says
    ray.init(
        address="local", num_cpus=4 if args.ddp_cpu else None, include_dashboard=False, log_to_driver=False
    )
    try:
        TorchTrainer(
            _ddp_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=2, use_gpu=gpu),
            run_config=RunConfig(name="gpu_check_ddp", storage_path=str(tmp / "ray")),
        ).fit()
    finally:
        ray.shutdown()
    return {
        **json.loads(Path(config["out"]).read_text()),
        "crop": config["crop"],
        "batch_per_worker": config["batch"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the harness end to end")
    p.add_argument("--cpu-compile", action="store_true", help="with --cpu-smoke: compile the fast arms too")
    p.add_argument("--ddp-cpu", action="store_true", help="run the DDP section on 2 gloo CPU workers")
    p.add_argument("--budget-s", type=float, default=450.0, help="no section starts after this many seconds")
    p.add_argument("--fit-epochs", type=int, default=4)
    p.add_argument("--fit-iters", type=int, default=50, help="steps per epoch of each fit arm")
    p.add_argument(
        "--sections",
        nargs="+",
        default=SECTIONS,
        choices=SECTIONS,
        help="run only these (e.g. to repeat one that failed)",
    )
    p.add_argument("--out", default="bench/out/gpu_check.json")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device: run with --cpu-smoke (tiny sizes) or on a GPU machine")

    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    two_gpus = torch.cuda.is_available() and torch.cuda.device_count() >= 2
    summary: dict[str, Any] = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "budget_s": args.budget_s}
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as d:
        tmp = Path(d)
        sections: list[tuple[str, Callable[[], Any] | None, str]] = [
            ("info", info, ""),
            ("gpu_tests", lambda: gpu_tests(tmp), ""),
            ("bench", lambda: bench(args, tmp), ""),
            # a fit arm stops at an epoch boundary past its deadline, leaving the DDP step its time
            ("fit", lambda: fit_agreement(args, tmp, deadline - (120 if two_gpus else 0)), ""),
            (
                "ddp",
                (lambda: ddp(args, tmp)) if (two_gpus or args.ddp_cpu) else None,
                f"needs two GPUs ({torch.cuda.device_count()} here); --ddp-cpu runs it on 2 CPU workers",
            ),
        ]
        for name, run, why_not in sections:
            if name not in args.sections:
                continue
            if run is None:
                summary[name] = {"skipped": why_not}
                continue
            if time.monotonic() > deadline:
                summary[name] = {"skipped": f"budget of {args.budget_s:.0f} s spent"}
                continue
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON summary alone
                    summary[name] = run()
            except Exception as e:  # noqa: BLE001 - one failing section must not hide the others
                summary[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            if isinstance(summary[name], dict):
                summary[name]["seconds"] = time.perf_counter() - t0
    summary["total_seconds"] = time.monotonic() - t_start
    summary["ok"] = not any(isinstance(v, dict) and "error" in v for v in summary.values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2, default=str)
    out.write_text(text)
    print(text)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
