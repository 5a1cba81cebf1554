"""Split builder: protocol rules, split.json, atomic all-or-nothing writes, clear errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.errors import DataError
from pipeline.data.splits import (
    blended_split,
    classic_split,
    expected_labeled,
    make_splits,
    random_split,
    read_list,
    write_list,
)

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.data.splits", *args], capture_output=True, text=True
    )


def line(i: str) -> str:
    return f"JPEGImages/{i}.jpg SegmentationClass/{i}.png"


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def lists(tmp_path: Path) -> Path:
    """A prepared-lists folder: 40 train (first 12 fine-annotated), 6 val; files exist under the root."""
    root = tmp_path / "prepared"
    ids = [f"2008_{i:06d}" for i in range(40)]
    val = [f"2007_{i:06d}" for i in range(6)]
    for i in ids + val:
        for rel in line(i).split():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x")
    d = root / "lists"
    write_list(d / "train.txt", [line(i) for i in reversed(ids)])  # unsorted on purpose
    write_list(d / "train_fine.txt", [line(i) for i in ids[:12]])
    write_list(d / "val.txt", [line(i) for i in val])
    return d


def test_read_list_tolerates_crlf_blanks_and_no_trailing_newline(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"a b\r\n\r\n  c d  \r\ne f")
    assert read_list(p) == ["a b", "c d", "e f"]
    with pytest.raises(DataError, match="missing.txt"):
        read_list(tmp_path / "missing.txt")


def test_write_list_is_atomic_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "l.txt"
    write_list(p, ["x", "y"])
    write_list(p, ["z"])
    assert p.read_text() == "z\n"
    assert [q.name for q in p.parent.iterdir()] == ["l.txt"]


def test_blended_is_every_kth_of_sorted_list():
    ids = [f"id{i:02d}" for i in range(10)][::-1]
    lab, unl = blended_split(ids, 3)
    assert lab == ["id00", "id03", "id06", "id09"]
    assert unl == ["id01", "id02", "id04", "id05", "id07", "id08"]
    # full list lines sort like their ids (same prefix), so the result is the same set of items
    lab2, _ = blended_split([line(i) for i in ids], 3)
    assert lab2 == [line(i) for i in lab]
    with pytest.raises(DataError, match="duplicate"):
        blended_split(["a", "b", "a"], 2)


def test_classic_and_random_are_seeded_and_disjoint():
    fine = [f"f{i}" for i in range(20)]
    pool = fine + [f"s{i}" for i in range(50)]
    a = classic_split(fine, pool, 5, seed=1)
    assert a == classic_split(fine[::-1], pool[::-1], 5, seed=1)  # input order does not matter
    assert a != classic_split(fine, pool, 5, seed=2)
    lab, unl = a
    assert len(lab) == 5 and set(lab) <= set(fine) and set(lab).isdisjoint(unl)
    assert set(lab) | set(unl) == set(pool)
    assert classic_split(fine, pool, 20, seed=3)[0] == sorted(fine)  # n == len(fine): all of them
    with pytest.raises(DataError, match="cannot draw 21"):
        classic_split(fine, pool, 21, seed=0)
    with pytest.raises(DataError, match="not in the train pool"):
        classic_split(fine + ["zz"], pool, 3, seed=0)
    r = random_split(pool, 7, seed=0)
    assert r == random_split(pool[::-1], 7, seed=0) and len(r[0]) == 7 and len(r[1]) == 63


def test_count_rules_reproduce_the_published_sizes():
    assert [expected_labeled("cityscapes", s, 2975) for s in ("1_16", "1_8", "1_4", "1_2", "1_30")] == [
        186,
        372,
        744,
        1488,
        100,
    ]
    assert [expected_labeled("blended", s, 10582) for s in ("1_16", "1_8", "1_4", "1_2")] == [
        662,
        1323,
        2646,
        5291,
    ]
    assert [expected_labeled("classic", s, 10582, 1464) for s in ("92", "183", "366", "732", "1464")] == [
        92,
        183,
        366,
        732,
        1464,
    ]


@pytest.mark.parametrize(
    ("protocol", "splits", "n_lab"),
    [
        ("blended", ["1_16", "1_8", "1_4", "1_2"], [3, 5, 10, 20]),
        ("classic", ["3", "12"], [3, 12]),
        ("cityscapes", ["1_30", "1_8"], [2, 5]),
        ("random", ["1_4"], [10]),
    ],
)
def test_make_splits_writes_lists_and_split_json(lists, tmp_path, protocol, splits, n_lab):
    out = tmp_path / "splits"
    summary = make_splits(lists, out, protocol, splits, seed=5, root=lists.parent)
    train = read_list(lists / "train.txt")
    for split, n in zip(splits, n_lab, strict=True):
        lab, unl = read_list(out / split / "labeled.txt"), read_list(out / split / "unlabeled.txt")
        assert len(lab) == n and set(lab) | set(unl) == set(train) and not set(lab) & set(unl)
        meta = json.loads((out / split / "split.json").read_text())
        assert meta == {
            "protocol": protocol,
            "split": split,
            "n_labeled": n,
            "n_unlabeled": 40 - n,
            "n_train": 40,
            "source": "generate",
            "seed": 5,
        }
        assert summary[split] == meta
        if protocol == "classic":
            assert set(lab) <= set(read_list(lists / "train_fine.txt"))
    assert read_list(out / "val.txt") == read_list(lists / "val.txt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_blended_is_nested(lists, tmp_path):
    make_splits(lists, tmp_path / "s", "blended", ["1_8", "1_4"])
    a, b = (set(read_list(tmp_path / "s" / s / "labeled.txt")) for s in ("1_8", "1_4"))
    assert a < b


@pytest.mark.parametrize(
    ("protocol", "splits", "match"),
    [
        ("semi", ["1_8"], "splits.protocol"),
        ("blended", ["92"], "'92'.*fractions"),
        ("blended", ["1_0"], "'1_0'"),
        ("blended", ["1_1"], "unlabeled list is empty"),
        ("cityscapes", ["half"], "'half'"),
        ("classic", ["1_8"], "'1_8'.*labeled count"),
        ("classic", ["13"], "only 12 fine-annotated"),
        ("blended", [], "no split names"),
    ],
)
def test_bad_protocol_or_split_name(lists, tmp_path, protocol, splits, match):
    with pytest.raises(DataError, match=match):
        make_splits(lists, tmp_path / "s", protocol, splits)


def test_classic_without_train_fine(lists, tmp_path):
    (lists / "train_fine.txt").unlink()
    with pytest.raises(DataError, match="train_fine.txt"):
        make_splits(lists, tmp_path / "s", "classic", ["3"])


def test_missing_or_malformed_input_lists(lists, tmp_path):
    (lists / "val.txt").write_text("")
    with pytest.raises(DataError, match=r"val\.txt: the list is empty"):
        make_splits(lists, tmp_path / "s", "blended", ["1_4"])
    (lists / "val.txt").write_text("JPEGImages/x.jpg SegmentationClass/x.png extra\n")
    with pytest.raises(DataError, match=r"val\.txt:1: expected '<image path> <mask path>'"):
        make_splits(lists, tmp_path / "s", "blended", ["1_4"])
    (lists / "val.txt").unlink()
    with pytest.raises(DataError, match=r"val\.txt: list file not found"):
        make_splits(lists, tmp_path / "s", "blended", ["1_4"])


def test_missing_referenced_file_is_named(lists, tmp_path):
    victim = sorted(read_list(lists / "train.txt"))[1].split()[1]
    (lists.parent / victim).unlink()
    with pytest.raises(DataError, match=f"{victim} is listed but does not exist"):
        make_splits(lists, tmp_path / "s", "blended", ["1_4"], root=lists.parent)
    make_splits(lists, tmp_path / "s", "blended", ["1_4"])  # no root: existence is not checked


def _official_tree(lists: Path, d: Path, split: str, lab: list[str], unl: list[str]) -> Path:
    write_list(d / split / "labeled.txt", lab)
    write_list(d / split / "unlabeled.txt", unl)
    write_list(d / "val.txt", read_list(lists / "val.txt")[::-1])
    return d


def test_official_source_copies_published_lists(lists, tmp_path):
    train = read_list(lists / "train.txt")
    lab, unl = train[:10], train[10:]
    off = _official_tree(lists, tmp_path / "pub", "1_4", lab, unl)
    info = make_splits(lists, tmp_path / "s", "blended", ["1_4"], source="official", official_root=off)
    assert read_list(tmp_path / "s" / "1_4" / "labeled.txt") == lab  # published order kept
    assert read_list(tmp_path / "s" / "val.txt") == read_list(off / "val.txt")
    assert info["1_4"]["source"] == "official"
    assert json.loads((tmp_path / "s" / "1_4" / "split.json").read_text())["protocol"] == "blended"


def test_official_source_errors(lists, tmp_path):
    train = read_list(lists / "train.txt")
    with pytest.raises(DataError, match="official_root is not set"):
        make_splits(lists, tmp_path / "s", "blended", ["1_4"], source="official")
    off = _official_tree(lists, tmp_path / "pub", "1_4", train[:10], train[10:])
    with pytest.raises(DataError, match=r"1_8/labeled\.txt: published split list file not found"):
        make_splits(lists, tmp_path / "s", "blended", ["1_8"], source="official", official_root=off)
    off = _official_tree(lists, tmp_path / "pub2", "1_4", train[:9], train[9:])
    with pytest.raises(DataError, match="9 labeled items.*expects 10"):
        make_splits(lists, tmp_path / "s", "blended", ["1_4"], source="official", official_root=off)
    off = _official_tree(lists, tmp_path / "pub3", "1_4", train[:10], train[9:])
    with pytest.raises(DataError, match="both in labeled.txt and unlabeled.txt"):
        make_splits(lists, tmp_path / "s", "blended", ["1_4"], source="official", official_root=off)
    off = _official_tree(lists, tmp_path / "pub4", "1_4", [], train)
    with pytest.raises(DataError, match="labeled list is empty"):
        make_splits(lists, tmp_path / "s", "blended", ["1_4"], source="official", official_root=off)
    off = _official_tree(lists, tmp_path / "pub5", "1_4", train[:10], train[10:-1])
    with pytest.raises(DataError, match="must equal the 40 train items"):
        make_splits(lists, tmp_path / "s", "blended", ["1_4"], source="official", official_root=off)
    off = _official_tree(lists, tmp_path / "pub6", "1_4", train[:10], train[10:])
    (lists.parent / train[3].split()[0]).unlink()
    with pytest.raises(DataError, match="is listed but does not exist"):
        make_splits(
            lists, tmp_path / "s", "blended", ["1_4"], source="official", official_root=off, root=lists.parent
        )


def test_failure_leaves_previous_output_intact(lists, tmp_path):
    out = tmp_path / "s"
    make_splits(lists, out, "blended", ["1_8", "1_4"])
    before = snapshot(out)
    with pytest.raises(DataError):
        make_splits(lists, out, "blended", ["1_2", "oops"])  # first split would succeed, second fails
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "s"]
    make_splits(lists, out, "random", ["1_2"])  # a later success replaces the whole tree
    assert sorted(p.name for p in out.iterdir()) == ["1_2", "val.txt"]


def test_cli(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(f"x{i:03d}" for i in range(32)))
    out = tmp_path / "out"
    from pipeline.data.splits import main

    assert (
        main(["--ids", str(ids), "--protocol", "blended", "--splits", "1_16", "1_8", "--out", str(out)]) == 0
    )
    assert read_list(out / "1_16" / "labeled.txt") == ["x000", "x016"]
    assert json.loads((out / "1_8" / "split.json").read_text())["n_labeled"] == 4
    r = _cli("--ids", str(ids), "--splits", "1_x", "--out", str(out))
    assert r.returncode == 2 and "'1_x'" in r.stderr
    assert read_list(out / "1_16" / "labeled.txt") == ["x000", "x016"]  # untouched
    assert main(["--ids", str(tmp_path / "nope.txt"), "--splits", "1_2", "--out", str(out)]) == 2


def test_classic_is_seeded_and_uses_the_fine_pool():
    fine, pool = [f"f{i}" for i in range(10)], [f"f{i}" for i in range(10)] + [f"x{i}" for i in range(5)]
    a, ua = classic_split(fine, pool, 3, seed=1)
    b, _ = classic_split(fine, pool, 3, seed=1)
    assert a == b and set(a) <= set(fine) and len(ua) == 12 and not set(a) & set(ua)
    assert classic_split(fine, pool, 3, seed=2)[0] != a


def _lists(tmp_path, train, val=("v1",)):
    write_list(tmp_path / "lists" / "train.txt", train)
    write_list(tmp_path / "lists" / "val.txt", val)
    return tmp_path / "lists"


def test_bad_input_names_the_problem_and_keeps_earlier_output(tmp_path):
    lists = _lists(tmp_path, [f"i{i}" for i in range(8)])
    make_splits(lists, tmp_path / "out", "blended", ["1_2"])
    before = read_list(tmp_path / "out" / "1_2" / "labeled.txt")
    with pytest.raises(DataError, match="expects fractions"):
        make_splits(lists, tmp_path / "out", "blended", ["1_4", "92"])
    with pytest.raises(DataError, match="unlabeled list is empty"):
        make_splits(lists, tmp_path / "out", "blended", ["1_1"])
    with pytest.raises(DataError, match="protocol must be one of"):
        make_splits(lists, tmp_path / "out", "u2pl", ["1_2"])
    with pytest.raises(DataError, match="train_fine"):
        make_splits(lists, tmp_path / "out", "classic", ["3"])
    assert read_list(tmp_path / "out" / "1_2" / "labeled.txt") == before
    assert not (tmp_path / "out" / "1_4").exists()


def test_missing_file_named_in_a_list(tmp_path):
    (tmp_path / "root" / "JPEGImages").mkdir(parents=True)
    (tmp_path / "root" / "JPEGImages" / "a.jpg").write_bytes(b"x")
    lists = _lists(tmp_path, ["JPEGImages/a.jpg", "JPEGImages/b.jpg"])
    with pytest.raises(DataError, match="JPEGImages/b.jpg"):
        make_splits(lists, tmp_path / "out", "blended", ["1_2"], root=tmp_path / "root")


def test_cli_builds_splits_from_any_id_list(tmp_path):
    ids = tmp_path / "ids.txt"
    ids.write_text("c\na\nb\nd\n")
    out = _cli("--ids", str(ids), "--splits", "1_2", "--out", str(tmp_path / "s"))
    assert out.returncode == 0, out.stderr
    assert read_list(tmp_path / "s" / "1_2" / "labeled.txt") == ["a", "c"]
    assert read_list(tmp_path / "s" / "1_2" / "unlabeled.txt") == ["b", "d"]
    bad = _cli("--ids", str(ids), "--splits", "1_0", "--out", str(tmp_path / "s"))
    assert bad.returncode == 2 and "1_0" in bad.stderr
