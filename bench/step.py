"""Benchmark the full DSSN training step: fp32 eager reference vs the project's fast path.

One run, one device: step throughput (labeled + unlabeled images/s), peak GPU memory, achieved
TFLOP/s (FLOPs counted once with torch's FlopCounterMode), and the data pipeline on its own.
Prints a table and writes JSON. Defaults are the paper's VOC setting (ResNet-101, crop 513,
batch 8 + 8); `--quick` is a CPU-sized smoke configuration.

    python bench/step.py                 # on a GPU: the paper setting
    python bench/step.py --quick         # anywhere: tiny model, checks the harness
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import MethodCfg, ModelCfg, TrainCfg
from pipeline.method.dssn import Batch
from pipeline.train import Trainer, pick_device

MODES = {
    "fp32-eager": {"amp": False, "channels_last": False, "compile": False},
    "fast": {"amp": True, "channels_last": True, "compile": True},
}


def random_batch(
    n_l: int, n_u: int, crop: int, classes: int, device: torch.device, g: torch.Generator
) -> Batch:
    def img(n):
        return torch.randint(0, 256, (n, 3, crop, crop), dtype=torch.uint8, generator=g).to(device)

    ign = torch.zeros(n_u, crop, crop, dtype=torch.bool)
    ign[:, :, -crop // 8 :] = True  # some crop padding, as real weak crops have
    y = torch.randint(0, classes, (n_l, crop, crop), generator=g)
    y[:, :2] = 255
    return Batch(
        x=img(n_l), y=y.to(device), u=img(n_u), u_ign=ign.to(device), m=img(n_u), m_ign=ign.to(device)
    )


def bench_mode(mode: str, args, device: torch.device) -> dict:
    model = ModelCfg(backbone=args.backbone, deep_stem=True)
    if args.quick:
        model = ModelCfg(
            backbone="resnet18", deep_stem=False, aspp_channels=32, skip_channels=16, decoder_channels=32
        )
    train = dataclasses.replace(
        TrainCfg(crop=args.crop, batch_l=args.batch, batch_u=args.batch, fast_path_on_cpu=args.cpu_fast),
        **MODES[mode],
    )
    trainer = Trainer(model, train, MethodCfg(), args.classes, device)
    g = torch.Generator().manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    batches = [random_batch(args.batch, args.batch, args.crop, args.classes, device, g) for _ in range(2)]
    total = args.warmup + args.iters + 10

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_compile = time.perf_counter()
    for i in range(args.warmup):
        trainer.step(batches[i % 2], gen, i, total)
    sync()
    warmup_s = time.perf_counter() - t_compile
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.iters):
        trainer.step(batches[i % 2], gen, args.warmup + i, total)
    sync()
    dt = (time.perf_counter() - t0) / args.iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    flops = count_flops(trainer, batches[0], gen, total) if mode == "fp32-eager" else None
    return {
        "mode": mode,
        "step_s": dt,
        "images_per_s": 2 * args.batch / dt,
        "peak_mem_gib": peak,
        "warmup_s": warmup_s,
        "compiled": trainer.compiled,
        "autocast_bf16": trainer.autocast,  # as applied: the fast path is CUDA-only unless --cpu-fast
        "flops_per_step": flops,
    }


def count_flops(trainer: Trainer, batch: Batch, gen: torch.Generator, total: int) -> float:
    """FLOPs of one full step (forward + backward of every view; EMA/optimizer are negligible)."""
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.step(batch, gen, 5, total)
    return float(counter.get_total_flops())


def bench_loader(args) -> dict:
    """The data pipeline alone: labeled + unlabeled + CutMix-partner samples per second."""
    from torch.utils.data import DataLoader

    from pipeline.data.datasets import SegList
    from pipeline.data.prepare import prepare_voc
    from pipeline.data.splits import make_splits
    from pipeline.data.synthetic import generate

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        generate(d / "raw", n_train=64, n_val=4, size=max(args.crop * 3 // 4, 32), seed=0)
        prepare_voc(d / "raw", d / "prepared", num_classes=7)
        make_splits(d / "prepared" / "lists", d / "splits", "blended", ["1_4"])
        unl = SegList(d / "prepared", d / "splits" / "1_4" / "unlabeled.txt", "train_u", args.crop)
        lab = SegList(
            d / "prepared", d / "splits" / "1_4" / "labeled.txt", "train_l", args.crop, length=len(unl)
        )
        loaders = [
            DataLoader(
                ds,
                batch_size=args.batch,
                shuffle=True,
                num_workers=args.workers,
                drop_last=True,
                persistent_workers=args.workers > 0,
            )
            for ds in (lab, unl, unl)
        ]
        n, t0 = 0, time.perf_counter()
        for _ in range(2):
            for batches in zip(*loaders, strict=False):
                n += sum(len(b["image"]) for b in batches)
        return {"samples_per_s": n / (time.perf_counter() - t0), "workers": args.workers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet101", choices=["resnet50", "resnet101"])
    p.add_argument("--crop", type=int, default=513)
    p.add_argument("--batch", type=int, default=8, help="labeled = unlabeled batch size")
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--quick", action="store_true", help="tiny CPU configuration (harness check)")
    p.add_argument(
        "--cpu-fast", action="store_true", help="apply the fast path on a CPU too (train.fast_path_on_cpu)"
    )
    p.add_argument("--out", default="bench/out/step.json")
    args = p.parse_args(argv)
    if args.quick:
        args.crop, args.batch, args.iters, args.warmup, args.workers = 64, 2, 3, 1, 0
    device = pick_device(TrainCfg())
    torch.manual_seed(0)
    rows = [bench_mode(m, args, device) for m in args.modes]
    flops = next((r["flops_per_step"] for r in rows if r["flops_per_step"]), None)
    for r in rows:
        r["tflops"] = flops / r["step_s"] / 1e12 if flops else None
    ref = next((r for r in rows if r["mode"] == "fp32-eager"), None)
    loader = bench_loader(args)
    info = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "backbone": args.backbone if not args.quick else "resnet18 (quick)",
        "crop": args.crop,
        "batch": f"{args.batch}+{args.batch}",
    }
    print(
        f"device: {info['device']}  torch {info['torch']}  {info['backbone']}  crop {args.crop}  "
        f"batch {info['batch']}"
    )
    print(f"{'mode':<12}{'step s':>9}{'img/s':>9}{'x ref':>7}{'TFLOP/s':>9}{'peak GiB':>10}{'compiled':>10}")
    for r in rows:
        speed = r["images_per_s"] / ref["images_per_s"] if ref else float("nan")
        tf = f"{r['tflops']:.1f}" if r["tflops"] else "-"
        print(
            f"{r['mode']:<12}{r['step_s']:>9.3f}{r['images_per_s']:>9.1f}{speed:>7.2f}{tf:>9}"
            f"{r['peak_mem_gib']:>10.2f}{str(r['compiled']):>10}"
        )
    print(f"data pipeline: {loader['samples_per_s']:.1f} samples/s with {loader['workers']} workers")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "steps": rows, "loader": loader}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
