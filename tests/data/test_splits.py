"""Split protocols: the CPS rule against the published lists, counts, bad input, atomicity."""

import json
import subprocess
import sys

import pytest

from pipeline.data.errors import DataError
from pipeline.data.splits import blended_split, classic_split, make_splits, read_list, write_list
from tests.conftest import SHARED

UNIMATCH = SHARED / "splits" / "LiheYoung_UniMatch" / "splits"
CPS = SHARED / "splits" / "charlesCXK_TorchSemiSeg" / "DATA"
needs_lists = pytest.mark.skipif(not UNIMATCH.exists(), reason="../shared/splits not present")


def _ids(path):
    return [line.split()[0].split("/")[-1].removesuffix(".jpg") for line in read_list(path)]


@needs_lists
@pytest.mark.parametrize("k", [16, 8, 4, 2])
def test_blended_rule_reproduces_the_cps_lists_exactly(k):
    train_aug = _ids(UNIMATCH / "pascal" / "train_aug.txt")
    lab, unl = blended_split(train_aug, k)
    sub = CPS / "pascal_voc" / "subset_train_aug"
    assert lab == read_list(sub / f"train_aug_labeled_1-{k}.txt")
    assert unl == read_list(sub / f"train_aug_unlabeled_1-{k}.txt")
    if k != 2:  # UniMatch has no pascal 1_2; its other lists are the same ids in the same order
        assert [f"JPEGImages/{i}.jpg SegmentationClass/{i}.png" for i in lab] == read_list(
            UNIMATCH / "pascal" / f"1_{k}" / "labeled.txt")


@needs_lists
def test_protocol_counts_match_the_published_table(tmp_path):
    # dssn-method.md §9.3
    lists = tmp_path / "lists"
    write_list(lists / "train.txt", read_list(UNIMATCH / "pascal" / "train_aug.txt"))
    write_list(lists / "val.txt", read_list(UNIMATCH / "pascal" / "val.txt"))
    write_list(lists / "train_fine.txt", read_list(UNIMATCH / "pascal" / "1464" / "labeled.txt"))
    blended = make_splits(lists, tmp_path / "blended", "blended", ["1_16", "1_8", "1_4", "1_2"])
    assert [(v["n_labeled"], v["n_unlabeled"]) for v in blended.values()] == [
        (662, 9920), (1323, 9259), (2646, 7936), (5291, 5291)]
    classic = make_splits(lists, tmp_path / "classic", "classic", ["92", "183", "366", "732", "1464"])
    assert [(v["n_labeled"], v["n_unlabeled"]) for v in classic.values()] == [
        (92, 10490), (183, 10399), (366, 10216), (732, 9850), (1464, 9118)]
    fine = set(read_list(lists / "train_fine.txt"))
    assert set(read_list(tmp_path / "classic" / "92" / "labeled.txt")) <= fine
    city = tmp_path / "city_lists"
    train = read_list(UNIMATCH / "cityscapes" / "1_16" / "labeled.txt") + read_list(
        UNIMATCH / "cityscapes" / "1_16" / "unlabeled.txt")
    write_list(city / "train.txt", train)
    write_list(city / "val.txt", read_list(UNIMATCH / "cityscapes" / "val.txt"))
    cs = make_splits(city, tmp_path / "cs", "cityscapes", ["1_16", "1_8", "1_4", "1_2", "1_30"])
    assert [v["n_labeled"] for v in cs.values()] == [186, 372, 744, 1488, 100]
    assert [v["n_unlabeled"] for v in cs.values()] == [2789, 2603, 2231, 1487, 2875]
    meta = json.loads((tmp_path / "cs" / "1_30" / "split.json").read_text())
    assert meta["protocol"] == "cityscapes" and meta["n_train"] == 2975


@needs_lists
def test_official_source_copies_the_published_lists(tmp_path):
    lists = tmp_path / "lists"
    write_list(lists / "train.txt", read_list(UNIMATCH / "pascal" / "train_aug.txt"))
    write_list(lists / "val.txt", read_list(UNIMATCH / "pascal" / "val.txt"))
    make_splits(lists, tmp_path / "out", "classic", ["92"], source="official", official_root=UNIMATCH / "pascal")
    assert read_list(tmp_path / "out" / "92" / "labeled.txt") == read_list(UNIMATCH / "pascal" / "92" / "labeled.txt")
    with pytest.raises(DataError, match="list file not found"):
        make_splits(lists, tmp_path / "out2", "classic", ["91"], source="official",
                    official_root=UNIMATCH / "pascal")


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
    out = subprocess.run([sys.executable, "-m", "pipeline.data.splits", "--ids", str(ids), "--splits", "1_2",
                          "--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert read_list(tmp_path / "s" / "1_2" / "labeled.txt") == ["a", "c"]
    assert read_list(tmp_path / "s" / "1_2" / "unlabeled.txt") == ["b", "d"]
    bad = subprocess.run([sys.executable, "-m", "pipeline.data.splits", "--ids", str(ids), "--splits", "1_0",
                          "--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert bad.returncode == 2 and "1_0" in bad.stderr
