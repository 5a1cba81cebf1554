"""What the embedded demo can learn in its budget: step time and mIoU vs steps per candidate config.

Each candidate is a patch of the `demo` study's overrides in params.yaml (model / train / method);
a run trains one cell (split, variant, seed) through the pipeline's own `fit` (no Ray, no MLflow),
evaluates every `--eval-every` steps and records, per evaluation: steps, seconds of training
(wall and this process's CPU time, evaluation excluded), student/teacher mIoU, and for DSSN
`train/loss_s` and the teacher's kept fraction per class. Results are appended to
`bench/out/demo_budget.jsonl`; `--table` prints them as a Markdown table.

Run it pinned to one core with one thread, as a demo trial runs (2 trials on 2 cores):

    taskset -c 1 python bench/demo_budget.py --cand r18 --variant supervised --steps 800
    python bench/demo_budget.py --table
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline.train as train_mod  # noqa: E402
from pipeline.config import load_params, merge  # noqa: E402
from pipeline.orchestrate import study_specs  # noqa: E402

OUT = ROOT / "bench" / "out" / "demo_budget.jsonl"

# name -> {"model": {...}, "train": {...}, "method": {...}} on top of studies.demo.overrides
CANDIDATES: dict[str, dict[str, dict]] = {
    # the demo before issue 14 (ResNet-18 from scratch, IEEE denormals)
    "r18": {},
    "r18_ftz": {"train": {"flush_denormal": True}},
    "r18_os8_ftz": {"model": {"output_stride": 8}, "train": {"flush_denormal": True}},
    "mv3l_ftz": {"model": {"backbone": "mobilenet_v3_large"}, "train": {"flush_denormal": True}},
    "mv3l_os8_ftz": {
        "model": {"backbone": "mobilenet_v3_large", "output_stride": 8},
        "train": {"flush_denormal": True},
    },
    "mv3s_ftz": {"model": {"backbone": "mobilenet_v3_small"}, "train": {"flush_denormal": True}},
    "mv3s_os8_ftz": {
        "model": {"backbone": "mobilenet_v3_small", "output_stride": 8},
        "train": {"flush_denormal": True},
    },
}


def parse_patch(text: str) -> dict[str, dict]:
    """`model.output_stride=8,train.lr=0.002` -> {"model": {"output_stride": 8}, "train": {"lr": 0.002}}."""
    out: dict[str, dict] = {}
    for item in filter(None, re.split(r",(?=\w+\.\w+=)", text)):  # commas inside [..] stay
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        out.setdefault(section, {})[name] = json.loads(value) if value[:1] in "0123456789-[{tfn" else value
    return out


def run(args: argparse.Namespace) -> dict:
    root = Path(args.root).resolve() if args.root else ROOT
    params = load_params(root / "params.yaml")
    spec = next(
        s for s in study_specs(params, "demo", root) if s.split == args.split and s.variant == args.variant
    )
    patch = json.loads(json.dumps(CANDIDATES[args.cand]))
    for section, extra in parse_patch(args.set).items():
        patch.setdefault(section, {}).update(extra)
    iters = args.eval_every
    train_patch = {
        **patch.get("train", {}),
        "epochs": args.steps // iters,
        "iters_per_epoch": iters,
        "progress_every": 0,
        "threads": 1,
    }
    spec = dataclasses.replace(
        spec,
        seed=args.seed,
        model=merge(spec.model, patch.get("model", {}), "model"),
        train=merge(spec.train, train_patch, "train"),
        method=merge(spec.method, patch.get("method", {}), "method"),
    )
    eval_s = {"wall": 0.0, "cpu": 0.0}
    real_evaluate = train_mod.evaluate

    def timed_evaluate(*a, **k):
        t, c = time.perf_counter(), time.process_time()
        out = real_evaluate(*a, **k)
        eval_s["wall"] += time.perf_counter() - t
        eval_s["cpu"] += time.process_time() - c
        return out

    train_mod.evaluate = timed_evaluate
    curve = []
    t0, c0 = time.perf_counter(), time.process_time()

    def on_epoch(epoch: int, m: dict, _state: dict) -> None:
        kept = {k.split("/")[1]: round(v, 4) for k, v in m.items() if k.startswith("pseudo_kept_teacher/")}
        curve.append(
            {
                "steps": epoch * iters,
                "train_wall_s": round(time.perf_counter() - t0 - eval_s["wall"], 1),
                "train_cpu_s": round(time.process_time() - c0 - eval_s["cpu"], 1),
                "miou_student": round(m.get("val/miou_student", math.nan), 2),
                "miou_teacher": round(m.get("val/miou_teacher", math.nan), 2),
                "loss_s": round(m.get("train/loss_s", math.nan), 4),
                "kept_teacher": {k: v for k, v in kept.items() if not math.isnan(v)},
            }
        )
        print(json.dumps(curve[-1]), flush=True)

    train_mod.fit(spec, on_epoch=on_epoch)
    last = curve[-1]
    return {
        "root": str(root),
        "cand": args.cand,
        "set": args.set,
        "split": args.split,
        "variant": args.variant,
        "seed": args.seed,
        "steps": args.steps,
        "s_per_step_wall": round(last["train_wall_s"] / args.steps, 4),
        "s_per_step_cpu": round(last["train_cpu_s"] / args.steps, 4),
        "eval_s_each": round(eval_s["wall"] / len(curve), 2),
        "curve": curve,
        "torch_threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def table() -> str:
    rows = [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]
    lines = [
        "| root | candidate | patch | split | variant | seed | steps | s/step (cpu) "
        "| mIoU by step (best of student/teacher) | teacher kept (last) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        curve = " ".join(
            f"{c['steps']}:{max(c['miou_student'], c['miou_teacher'] if not math.isnan(c['miou_teacher']) else 0):.1f}"
            for c in r["curve"]
        )
        kept = r["curve"][-1]["kept_teacher"]
        fg = sum(1 for k, v in kept.items() if k != "background" and v > 0)
        kept_s = f"{fg} fg classes" if r["variant"] != "supervised" else ""
        lines.append(
            f"| {Path(r.get('root', str(ROOT))).name} | {r['cand']} | {r['set'] or ''} | {r['split']} | {r['variant']} | {r['seed']} | {r['steps']} "
            f"| {r['s_per_step_cpu']:.3f} | {curve} | {kept_s} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cand", choices=sorted(CANDIDATES), default="r18")
    p.add_argument("--set", default="", help="extra patch, e.g. train.lr=0.002,method.ema_keep=0.99")
    p.add_argument("--split", default="1_16")
    p.add_argument("--variant", default="supervised")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument(
        "--root",
        default="",
        help="a folder with its own params.yaml and data/ (prepared + splits), e.g. another scene",
    )
    p.add_argument("--table", action="store_true", help="print the recorded runs as a table and exit")
    args = p.parse_args()
    if args.table:
        print(table())
        return
    result = run(args)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps(result) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}))


if __name__ == "__main__":
    main()
