"""Labeled/unlabeled split lists in UniMatch's line format (`<image> <mask>`, paths relative to the root).

Protocols (recorded in every `split.json`, so results of different protocols can never be mixed up):

* `blended` — the CPS rule: labeled = every k-th item of the lexicographically sorted train list,
  starting at index 0; unlabeled = all other items, also in sorted order. Reproduces CPS
  `train_aug_{labeled,unlabeled}_1-{16,8,4,2}` and UniMatch `pascal/1_{16,8,4}` exactly, ids *and*
  order (both publish the unlabeled list in sorted order).
* `classic` — a fixed count (`92` ... `1464`) drawn from the fine-annotated pool (VOC train);
  unlabeled = the rest of the train list.
* `cityscapes` / `random` — fractions `1_k`, n = ceil(N / k) (2975 -> 186/372/744/1488, 1/30 -> 100),
  drawn seeded-random. The published lists' seeds are unknown, so a generated classic/cityscapes
  split has the published *sizes* but not the published ids.

Sources: `generate` (the rules above), `published` (the lists the paper used: UniMatch's files at a
pinned commit, downloaded or from a local copy, md5-verified; see pipeline/data/published.py) and
`official` (lists in a local folder laid out like UniMatch's `splits/<dataset>/`, not checksummed:
for lists the pin does not cover). Published and official lists are checked against the prepared
dataset: every listed item must be one of its train items, and together they must be all of them.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pipeline.data.errors import DataError
from pipeline.data.published import PublishedSource
from pipeline.io import replace_dir, write_json, write_text

PROTOCOLS = ("blended", "classic", "cityscapes", "random")
SOURCES = ("generate", "official", "published")


def read_list(path: Path) -> list[str]:
    """Non-empty stripped lines; tolerates CRLF and a missing trailing newline (both occur upstream)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: list file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read list file ({e})") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_list(path: Path, lines: Sequence[str]) -> None:
    """Atomic, so a reader never sees a half-written list."""
    write_text(path, "".join(f"{line}\n" for line in lines))


def _no_duplicates(ids: Sequence[str], what: str) -> None:
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(x for x in ids if x in seen or seen.add(x))
        raise DataError(f"{what}: duplicate entry {dup!r}")


def blended_split(ids: Sequence[str], denominator: int) -> tuple[list[str], list[str]]:
    """CPS rule: labeled = sorted(ids)[0::k]; unlabeled = the rest, in sorted order like CPS and UniMatch."""
    if denominator < 1:
        raise DataError(f"blended split: denominator must be >= 1, got {denominator}")
    _no_duplicates(ids, "blended split ids")
    s = sorted(ids)
    return s[0::denominator], [x for i, x in enumerate(s) if i % denominator]


def random_split(ids: Sequence[str], n_labeled: int, seed: int) -> tuple[list[str], list[str]]:
    """Seeded draw of n items; both lists come back sorted so the output depends only on (ids, n, seed)."""
    _no_duplicates(ids, "random split ids")
    s = sorted(ids)
    if not 0 < n_labeled <= len(s):
        raise DataError(f"random split: cannot draw {n_labeled} labeled items from {len(s)}")
    chosen = set(random.Random(seed).sample(s, n_labeled))
    return [x for x in s if x in chosen], [x for x in s if x not in chosen]


def classic_split(
    fine: Sequence[str], pool: Sequence[str], n_labeled: int, seed: int
) -> tuple[list[str], list[str]]:
    """Labeled drawn from the fine-annotated `fine` items; unlabeled = the rest of `pool` (sorted)."""
    _no_duplicates(fine, "classic split fine pool")
    _no_duplicates(pool, "classic split train pool")
    if not 0 < n_labeled <= len(fine):
        raise DataError(f"classic split: cannot draw {n_labeled} labeled items from {len(fine)} fine ones")
    missing = set(fine) - set(pool)
    if missing:
        raise DataError(
            f"classic split: {len(missing)} fine-annotated items are not in the train pool, "
            f"e.g. {sorted(missing)[0]!r}"
        )
    s = sorted(fine)
    labeled = s if n_labeled == len(s) else sorted(random.Random(seed).sample(s, n_labeled))
    lab = set(labeled)
    return labeled, [x for x in sorted(pool) if x not in lab]


def denominator(split: str, protocol: str) -> int:
    """`1_16` -> 16; anything else is a clear error naming the split."""
    head, sep, tail = split.partition("_")
    if head != "1" or not sep or not tail.isdigit() or int(tail) < 1:
        raise DataError(
            f"split {split!r}: protocol {protocol!r} expects fractions like '1_16', '1_8', '1_4', '1_2'"
        )
    return int(tail)


def expected_labeled(protocol: str, split: str, n_train: int, n_fine: int | None = None) -> int:
    """How many labeled items a split of this protocol must have (also used to check published lists)."""
    if protocol not in PROTOCOLS:
        raise DataError(f"splits.protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "classic":
        if not split.isdigit() or int(split) < 1:
            raise DataError(
                f"split {split!r}: protocol 'classic' expects a labeled count like '92' or '1464'"
            )
        n = int(split)
        if n_fine is not None and n > n_fine:
            raise DataError(
                f"split {split!r}: only {n_fine} fine-annotated items (train_fine.txt) to draw from"
            )
        return n
    return math.ceil(n_train / denominator(split, protocol))


def build_split(
    protocol: str, split: str, train: Sequence[str], fine: Sequence[str] | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """One (labeled, unlabeled) pair by protocol name."""
    n = expected_labeled(protocol, split, len(train), None if fine is None else len(fine))
    if protocol == "blended":
        return blended_split(train, denominator(split, protocol))
    if protocol == "classic":
        if fine is None:
            raise DataError("protocol 'classic' needs lists/train_fine.txt (the fine-annotated pool)")
        return classic_split(fine, train, n, seed)
    return random_split(train, n, seed)


def check_split(
    labeled: Sequence[str],
    unlabeled: Sequence[str],
    where: str,
    root: Path | None = None,
    train: Sequence[str] | None = None,
) -> None:
    """Reject empty, overlapping, duplicated or dangling lists before anything is written."""
    if not labeled:
        raise DataError(f"{where}/labeled.txt: the labeled list is empty")
    if not unlabeled:
        raise DataError(f"{where}/unlabeled.txt: the unlabeled list is empty")
    _no_duplicates(labeled, f"{where}/labeled.txt")
    _no_duplicates(unlabeled, f"{where}/unlabeled.txt")
    overlap = set(labeled) & set(unlabeled)
    if overlap:
        raise DataError(
            f"{where}: {len(overlap)} items are both in labeled.txt and unlabeled.txt, e.g. {sorted(overlap)[0]!r}"
        )
    if train is not None:
        union, full = set(labeled) | set(unlabeled), set(train)
        if union != full:
            extra, lost = sorted(union - full), sorted(full - union)
            raise DataError(
                f"{where}: labeled ∪ unlabeled must equal the {len(full)} train items; "
                f"{len(extra)} not in train (e.g. {extra[:1]}), {len(lost)} train items missing (e.g. {lost[:1]})"
            )
    if root is not None:
        check_files(labeled, f"{where}/labeled.txt", root)
        check_files(unlabeled, f"{where}/unlabeled.txt", root)


def check_files(lines: Sequence[str], where: str, root: Path) -> None:
    """Every path named on every line must exist under the dataset root."""
    root = Path(root)
    for line in lines:
        for rel in line.split():
            if not (root / rel).is_file():
                raise DataError(f"{where}: {rel} is listed but does not exist under {root}")


def _pairs(lines: list[str], path: Path) -> list[str]:
    """UniMatch lines are `<image> <mask>`; a bare id/path is tolerated, more fields are not."""
    for no, line in enumerate(lines, 1):
        if len(line.split()) > 2:
            raise DataError(f"{path}:{no}: expected '<image path> <mask path>', got {line!r}")
    return lines


def _meta(protocol: str, split: str, lab: list[str], unl: list[str], source: str, seed: int) -> dict:
    return {
        "protocol": protocol,
        "split": split,
        "n_labeled": len(lab),
        "n_unlabeled": len(unl),
        "n_train": len(lab) + len(unl),
        "source": source,
        "seed": seed,
    }


def _official(official_root: Path, split: str) -> tuple[list[str], list[str]]:
    out = []
    for name in ("labeled.txt", "unlabeled.txt"):
        p = official_root / split / name
        if not p.is_file():
            raise DataError(
                f"{p}: published split list file not found (splits.official_root / {split} / {name})"
            )
        out.append(_pairs(read_list(p), p))
    return out[0], out[1]


def _published(source: PublishedSource, split: str) -> tuple[list[str], list[str]]:
    out = []
    for name in ("labeled.txt", "unlabeled.txt"):
        p, _ = source.get(f"{split}/{name}")
        out.append(_pairs(read_list(p), p))
    return out[0], out[1]


def _all_in_train(lines: Sequence[str], train: set[str], where: str, train_file: Path) -> None:
    """A listed item the prepared dataset lacks means the wrong dataset (or list): name it."""
    missing = [x for x in lines if x not in train]
    if missing:
        raise DataError(
            f"{where}: {len(missing)} listed items are not in the prepared dataset "
            f"({train_file}, {len(train)} train items), e.g. {missing[0]!r}"
        )


def make_splits(
    lists_dir: Path,
    out_dir: Path,
    protocol: str,
    splits: Sequence[str],
    source: str = "generate",
    seed: int = 0,
    official_root: Path | None = None,
    root: Path | None = None,
    published: PublishedSource | None = None,
) -> dict:
    """Write `<out>/<split>/{labeled,unlabeled}.txt` + `split.json` and `<out>/val.txt`, all or nothing.

    Returns `{split: split.json contents}`. With `root`, every referenced file is checked to exist
    under it. Published lists (`source="published"`, from `published`; or `source="official"`, from
    `official_root`) must hold exactly the items of `train.txt` (whose files `prepare` already
    validated) and the protocol's labeled count, so a copied split can never refer to a file the
    prepared dataset lacks; `published` lists are md5-verified first and split.json records their
    origin and md5s.
    """
    if protocol not in PROTOCOLS:
        raise DataError(f"splits.protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if source not in SOURCES:
        raise DataError(f"splits.source must be one of {SOURCES}, got {source!r}")
    if not splits:
        raise DataError("splits.names: no split names given")
    _no_duplicates(list(splits), "splits.names")
    lists_dir, out_dir = Path(lists_dir), Path(out_dir)
    train = _pairs(read_list(lists_dir / "train.txt"), lists_dir / "train.txt")
    val = _pairs(read_list(lists_dir / "val.txt"), lists_dir / "val.txt")
    fine_path = lists_dir / "train_fine.txt"
    fine = _pairs(read_list(fine_path), fine_path) if fine_path.exists() else None
    for lst, p in ((train, lists_dir / "train.txt"), (val, lists_dir / "val.txt")):
        if not lst:
            raise DataError(f"{p}: the list is empty")
        _no_duplicates(lst, str(p))
    both = set(train) & set(val)
    if both:
        raise DataError(
            f"{lists_dir}: {len(both)} items are in both train.txt and val.txt, e.g. {min(both)!r}"
        )
    pub_val: tuple[list[str], str] | None = None  # (published val list, where it came from)
    if source == "official":
        if official_root is None:
            raise DataError("splits.source is 'official' but splits.official_root is not set")
        official_root = Path(official_root)
        if (official_root / "val.txt").is_file():
            p = official_root / "val.txt"
            pub_val = (_pairs(read_list(p), p), str(p))
    if source == "published":
        if published is None:
            raise DataError("splits.source is 'published' but no published source was given")
        published.check_known(splits)  # before any download
        p, _ = published.get("val.txt")
        pub_val = (_pairs(read_list(p), p), published.origin("val.txt"))
    train_set = set(train)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    summary: dict[str, dict] = {}
    try:
        for split in splits:
            where = f"{out_dir}/{split}"
            n_expected = expected_labeled(protocol, split, len(train), None if fine is None else len(fine))
            extra: dict = {}
            if source in ("official", "published"):
                if source == "official":
                    lab, unl = _official(official_root, split)
                    where = str(official_root / split)
                else:
                    lab, unl = _published(published, split)
                    where = published.origin(split)
                    extra = {"published": published.describe(split)}
                _all_in_train(lab, train_set, f"{where}/labeled.txt", lists_dir / "train.txt")
                _all_in_train(unl, train_set, f"{where}/unlabeled.txt", lists_dir / "train.txt")
                check_split(lab, unl, where, root, train=train)
                if len(lab) != n_expected:
                    raise DataError(
                        f"{where}/labeled.txt: {len(lab)} labeled items, but protocol "
                        f"{protocol!r} split {split!r} of {len(train)} train items expects {n_expected}"
                    )
            else:
                lab, unl = build_split(protocol, split, train, fine, seed)
                check_split(lab, unl, where, root, train=train)
            if protocol == "classic" and fine is not None and not set(lab) <= set(fine):
                raise DataError(f"{where}/labeled.txt: classic labeled items must come from train_fine.txt")
            write_list(tmp / split / "labeled.txt", lab)
            write_list(tmp / split / "unlabeled.txt", unl)
            meta = {**_meta(protocol, split, lab, unl, source, seed), **extra}
            write_json(tmp / split / "split.json", meta, sort_keys=False)
            summary[split] = meta
        if pub_val is not None:
            if set(pub_val[0]) != set(val):
                raise DataError(
                    f"{pub_val[1]}: published val list ({len(pub_val[0])} items) differs from "
                    f"{lists_dir / 'val.txt'} ({len(val)} items)"
                )
            val = pub_val[0]
        if root is not None:
            check_files(val, f"{out_dir}/val.txt", root)
        write_list(tmp / "val.txt", val)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _check_out(out: Path) -> None:
    """--out is a folder (or can be one): a file there, or under a file, is refused, not replaced."""
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == out else f"is under the file {probe}"
        raise DataError(f"--out {out} {where}: give a folder (nothing was written)")


def _merge_into(tmp: Path, out: Path) -> None:
    """Swap each new split folder (and val.txt) into `out`; whatever else `out` holds is kept."""
    out.mkdir(parents=True, exist_ok=True)
    for item in sorted(tmp.iterdir()):
        if item.is_dir():
            replace_dir(item, out / item.name)
        else:
            os.replace(item, out / item.name)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.data.splits",
        description="Build split lists from any id (or list-line) file.",
    )
    p.add_argument("--ids", required=True, type=Path, help="one id or '<image> <mask>' line per line")
    p.add_argument("--protocol", default="blended", choices=PROTOCOLS)
    p.add_argument("--splits", nargs="+", required=True, help="e.g. 1_16 1_8 (fractions) or 92 183 (classic)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fine", type=Path, help="fine-annotated pool (protocol classic)")
    p.add_argument("--val", type=Path, help="val list to copy to <out>/val.txt")
    args = p.parse_args(argv)
    try:
        ids = read_list(args.ids)
        if not ids:
            raise DataError(f"{args.ids}: the id list is empty")
        fine = read_list(args.fine) if args.fine else None
        val = read_list(args.val) if args.val else None
        _no_duplicates(list(args.splits), "--splits")
        _check_out(args.out)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{args.out.name}-", dir=args.out.parent))
        try:
            for split in args.splits:
                lab, unl = build_split(args.protocol, split, ids, fine, args.seed)
                check_split(lab, unl, f"{args.out}/{split}", train=ids)
                write_list(tmp / split / "labeled.txt", lab)
                write_list(tmp / split / "unlabeled.txt", unl)
                write_json(
                    tmp / split / "split.json",
                    _meta(args.protocol, split, lab, unl, "generate", args.seed),
                    sort_keys=False,
                )
                print(f"{split}: {len(lab)} labeled, {len(unl)} unlabeled")
            if val is not None:
                write_list(tmp / "val.txt", val)
            _merge_into(tmp, args.out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # an uncreatable or unwritable --out
        print(f"error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
