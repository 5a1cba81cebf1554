"""Labeled/unlabeled split lists, in UniMatch's line format (`<image> <mask>` per line).

Protocols: `blended` (CPS rule: every k-th item of the sorted train list from index 0; the
unlabeled list is the rest in sorted order — reproduces CPS/UniMatch 1/16, 1/8, 1/4, 1/2
exactly), `classic` (fixed counts drawn from the fine-annotated pool, e.g. VOC 92...1464),
`cityscapes` (fractions, ceil(n/k): 186/372/744/1488 and 1/30 -> 100) and `random`.
The published lists' seeds are unknown, so `classic`/`cityscapes` draws are seeded random;
`source: official` copies the published lists instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.errors import DataError

PROTOCOLS = ("blended", "classic", "cityscapes", "random")


def read_list(path: Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: list file not found")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def write_list(path: Path, lines: Sequence[str]) -> None:
    """Atomic write (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)


def blended_split(ids: Sequence[str], denominator: int) -> tuple[list[str], list[str]]:
    """CPS rule: labeled = sorted(ids)[0::k], unlabeled = the others, both in sorted order."""
    if denominator < 1:
        raise DataError(f"blended split: denominator must be >= 1, got {denominator}")
    s = sorted(ids)
    return s[0::denominator], [x for i, x in enumerate(s) if i % denominator]


def random_split(ids: Sequence[str], n_labeled: int, seed: int) -> tuple[list[str], list[str]]:
    s = sorted(ids)
    if not 0 < n_labeled <= len(s):
        raise DataError(f"random split: cannot draw {n_labeled} labeled items from {len(s)}")
    chosen = set(random.Random(seed).sample(s, n_labeled))
    return [x for x in s if x in chosen], [x for x in s if x not in chosen]


def classic_split(fine: Sequence[str], pool: Sequence[str], n_labeled: int, seed: int) -> tuple[list[str], list[str]]:
    """Labeled drawn from the fine-annotated `fine` ids; unlabeled = the rest of `pool`."""
    if not 0 < n_labeled <= len(fine):
        raise DataError(f"classic split: cannot draw {n_labeled} labeled items from {len(fine)} fine ones")
    labeled = sorted(fine) if n_labeled == len(fine) else sorted(random.Random(seed).sample(sorted(fine), n_labeled))
    lab = set(labeled)
    return labeled, [x for x in sorted(pool) if x not in lab]


def _denominator(split: str, protocol: str) -> int:
    if not split.startswith("1_") or not split[2:].isdigit() or int(split[2:]) < 1:
        raise DataError(f"split {split!r}: protocol {protocol} expects fractions like '1_16', '1_8'")
    return int(split[2:])


def _one_split(protocol: str, split: str, train: list[str], fine: list[str] | None, seed: int):
    if protocol == "blended":
        return blended_split(train, _denominator(split, protocol))
    if protocol == "classic":
        if not split.isdigit():
            raise DataError(f"split {split!r}: protocol classic expects a labeled count like '92' or '1464'")
        if fine is None:
            raise DataError("protocol classic needs lists/train_fine.txt (the fine-annotated pool)")
        return classic_split(fine, train, int(split), seed)
    n = math.ceil(len(train) / _denominator(split, protocol))
    return random_split(train, n, seed)


def make_splits(lists_dir: Path, out_dir: Path, protocol: str, splits: Sequence[str], source: str = "generate",
                seed: int = 0, official_root: Path | None = None, root: Path | None = None) -> dict:
    """Write `<out>/<split>/{labeled,unlabeled}.txt`, `split.json` and `<out>/val.txt` (atomically)."""
    if protocol not in PROTOCOLS:
        raise DataError(f"splits.protocol must be one of {PROTOCOLS}, got {protocol!r}")
    lists_dir, out_dir = Path(lists_dir), Path(out_dir)
    train, val = read_list(lists_dir / "train.txt"), read_list(lists_dir / "val.txt")
    fine = read_list(lists_dir / "train_fine.txt") if (lists_dir / "train_fine.txt").exists() else None
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    summary = {}
    try:
        for split in splits:
            if source == "official":
                if official_root is None:
                    raise DataError("splits.source is 'official' but splits.official_root is not set")
                lab = read_list(Path(official_root) / split / "labeled.txt")
                unl = read_list(Path(official_root) / split / "unlabeled.txt")
            else:
                lab, unl = _one_split(protocol, split, train, fine, seed)
            check_split(lab, unl, f"{out_dir}/{split}", root)
            write_list(tmp / split / "labeled.txt", lab)
            write_list(tmp / split / "unlabeled.txt", unl)
            meta = {"protocol": protocol, "split": split, "n_labeled": len(lab), "n_unlabeled": len(unl),
                    "n_train": len(lab) + len(unl), "source": source, "seed": seed}
            (tmp / split / "split.json").write_text(json.dumps(meta, indent=2) + "\n")
            summary[split] = meta
        write_list(tmp / "val.txt", val)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return summary


def check_split(labeled: Sequence[str], unlabeled: Sequence[str], where: str, root: Path | None = None) -> None:
    if not labeled:
        raise DataError(f"{where}/labeled.txt: the labeled list is empty")
    if not unlabeled:
        raise DataError(f"{where}/unlabeled.txt: the unlabeled list is empty")
    overlap = set(labeled) & set(unlabeled)
    if overlap:
        raise DataError(f"{where}: {len(overlap)} items are both labeled and unlabeled, e.g. {sorted(overlap)[0]!r}")
    if root is not None:
        for line in (*labeled, *unlabeled):
            for rel in line.split():
                if not (Path(root) / rel).exists():
                    raise DataError(f"{where}: {rel} (listed) does not exist under {root}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build split lists from any id/line list.")
    p.add_argument("--ids", required=True, help="file with one id (or '<image> <mask>' line) per line")
    p.add_argument("--protocol", default="blended", choices=PROTOCOLS)
    p.add_argument("--splits", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fine", help="fine-annotated pool (classic protocol)")
    args = p.parse_args(argv)
    try:
        ids = read_list(Path(args.ids))
        fine = read_list(Path(args.fine)) if args.fine else None
        for split in args.splits:
            lab, unl = _one_split(args.protocol, split, ids, fine, args.seed)
            check_split(lab, unl, f"{args.out}/{split}")
            write_list(Path(args.out) / split / "labeled.txt", lab)
            write_list(Path(args.out) / split / "unlabeled.txt", unl)
            print(f"{split}: {len(lab)} labeled, {len(unl)} unlabeled")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
