"""Split source `published`: pinned md5s, offline folder, download from 127.0.0.1, cache, bad input.

Small lists with their own md5 table exercise the mechanics without ../shared; the pinned table is
checked against the published files in ../shared/splits (read in place, skipped when absent).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main as cli_main
from pipeline.config import ConfigError, load_params
from pipeline.data import published as pub
from pipeline.data.errors import DataError
from pipeline.data.published import PublishedSource
from pipeline.data.splits import make_splits, read_list, write_list
from tests.conftest import SHARED
from tests.data.server import Handler, LocalServer

UNIMATCH = SHARED / "splits" / "LiheYoung_UniMatch" / "splits"
CPS = SHARED / "splits" / "charlesCXK_TorchSemiSeg" / "DATA"
needs_lists = pytest.mark.skipif(not UNIMATCH.is_dir() or not CPS.is_dir(), reason="../shared/splits absent")


def line(i: str) -> str:
    return f"JPEGImages/{i}.jpg SegmentationClass/{i}.png"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def lists(tmp_path: Path) -> Path:
    """Prepared lists: 40 train (first 12 fine-annotated), 6 val; every listed file exists."""
    root = tmp_path / "prepared"
    ids, val = [f"2008_{i:06d}" for i in range(40)], [f"2007_{i:06d}" for i in range(6)]
    for i in ids + val:
        for rel in line(i).split():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"x")
    d = root / "lists"
    write_list(d / "train.txt", [line(i) for i in ids])
    write_list(d / "train_fine.txt", [line(i) for i in ids[:12]])
    write_list(d / "val.txt", [line(i) for i in val])
    return d


def published_files(lists: Path) -> dict[str, bytes]:
    """A `splits/pascal/` of classic split '3' (published order, no trailing newline, like UniMatch's)."""
    train = read_list(lists / "train.txt")
    lab = [train[7], train[2], train[9]]
    unl = [x for x in reversed(train) if x not in lab]
    return {
        "pascal/3/labeled.txt": "\n".join(lab).encode(),
        "pascal/3/unlabeled.txt": "\n".join(unl).encode(),
        "pascal/val.txt": "\n".join(reversed(read_list(lists / "val.txt"))).encode(),
    }


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def table(files: dict[str, bytes]) -> dict[str, str]:
    return {k: md5(v) for k, v in files.items()}


def lines_of(data: bytes) -> list[str]:
    return data.decode().splitlines()


# ----------------------------------------------------------------------------- the pin


def test_default_source_is_the_pinned_unimatch_commit():
    src = PublishedSource.for_kind("voc")
    assert pub.COMMIT == "0324f3dd4a22128105a5eb135d2586c0bb3cc647"
    assert src.url == f"https://raw.githubusercontent.com/LiheYoung/UniMatch/{pub.COMMIT}/splits"
    assert src.origin("92/labeled.txt") == f"{pub.URL}/pascal/92/labeled.txt"
    assert PublishedSource.for_kind("cityscapes").known_splits() == ["1_16", "1_8", "1_4", "1_2", "1_30"]
    assert PublishedSource.for_kind("voc").known_splits() == [
        "92",
        "183",
        "366",
        "732",
        "1464",
        "1_16",
        "1_8",
        "1_4",
    ]
    with pytest.raises(DataError, match="not for kind 'synthetic'"):
        PublishedSource.for_kind("synthetic")


@needs_lists
def test_pinned_md5s_are_those_of_the_published_files():
    """Every pinned md5 is the md5 of the file copied from the pinned commit (SOURCES.md)."""
    assert pub.COMMIT in (SHARED / "splits" / "SOURCES.md").read_text()
    for key, want in pub.MD5.items():
        assert md5((UNIMATCH / key).read_bytes()) == want, key


# ----------------------------------------------------------------------------- mechanics


def test_offline_folder_copies_the_lists_and_records_origin_and_md5(lists, tmp_path):
    files = published_files(lists)
    root = write_tree(tmp_path / "UniMatch" / "splits", files)
    src = PublishedSource("pascal", root=root, md5s=table(files))
    out = tmp_path / "out"
    info = make_splits(lists, out, "classic", ["3"], source="published", published=src, root=lists.parent)
    assert read_list(out / "3" / "labeled.txt") == lines_of(files["pascal/3/labeled.txt"])  # order kept
    assert read_list(out / "3" / "unlabeled.txt") == lines_of(files["pascal/3/unlabeled.txt"])
    assert read_list(out / "val.txt") == lines_of(files["pascal/val.txt"])
    meta = json.loads((out / "3" / "split.json").read_text())
    assert meta == info["3"]
    assert (meta["source"], meta["n_labeled"], meta["n_unlabeled"]) == ("published", 3, 37)
    assert meta["published"] == {
        "pinned": f"LiheYoung/UniMatch@{pub.COMMIT}",
        "from": str(root / "pascal" / "3"),
        "md5": {n: md5(files[f"pascal/{n}" if n == "val.txt" else f"pascal/3/{n}"]) for n in
                ("labeled.txt", "unlabeled.txt", "val.txt")},
    }  # fmt: skip


def test_download_from_localhost_then_cache_needs_no_request(lists, tmp_path):
    files = published_files(lists)
    cache = tmp_path / "data" / "published" / "voc"
    with LocalServer() as srv:
        for rel, data in files.items():
            srv.add(f"/mirror/splits/{rel}", data)
        src = PublishedSource("pascal", url=f"{srv.url}/mirror/splits", cache=cache, md5s=table(files))
        info = make_splits(lists, tmp_path / "a", "classic", ["3"], source="published", published=src)
        assert sorted(Handler.requests) == sorted(f"/mirror/splits/{rel}" for rel in files)
        assert info["3"]["published"]["from"] == f"{srv.url}/mirror/splits/pascal/3"
        n = len(Handler.requests)
        make_splits(lists, tmp_path / "b", "classic", ["3"], source="published", published=src)
        assert len(Handler.requests) == n  # second run: all from the cache
    assert snapshot(cache) == files  # verified bytes only, no .part files
    make_splits(lists, tmp_path / "c", "classic", ["3"], source="published", published=src)  # server gone
    assert snapshot(tmp_path / "a") == snapshot(tmp_path / "b") == snapshot(tmp_path / "c")
    # a damaged cached copy is not trusted: it is fetched again
    (cache / "pascal" / "3" / "labeled.txt").write_text("tampered")
    with pytest.raises(DataError, match="download from .* failed"):
        make_splits(lists, tmp_path / "d", "classic", ["3"], source="published", published=src)


def test_downloaded_list_failing_its_checksum_stops_and_keeps_earlier_output(lists, tmp_path):
    files = published_files(lists)
    pinned = table(files)
    out = tmp_path / "out"
    make_splits(lists, out, "blended", ["1_4"])
    before = snapshot(out)
    bad = files["pascal/3/labeled.txt"].replace(b"2008_000009", b"2008_000011")
    with LocalServer() as srv:
        for rel, data in {**files, "pascal/3/labeled.txt": bad}.items():
            srv.add(f"/{rel}", data)
        src = PublishedSource("pascal", url=srv.url, cache=tmp_path / "cache", md5s=pinned)
        with pytest.raises(DataError) as e:
            make_splits(lists, out, "classic", ["3"], source="published", published=src)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("published split list pascal/3/labeled.txt: checksum mismatch")
    assert (
        f"{srv.url}/pascal/3/labeled.txt" in msg and f"expected md5 {pinned['pascal/3/labeled.txt']}" in msg
    )
    assert snapshot(out) == before
    assert not (tmp_path / "cache" / "pascal" / "3" / "labeled.txt").exists()
    assert not list((tmp_path / "cache").rglob("*.part"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "out", "prepared"]  # no temp dirs


def test_local_list_failing_its_checksum_is_named(lists, tmp_path):
    files = published_files(lists)
    pinned = table(files)
    val = files["pascal/val.txt"] + b"\n"  # one trailing newline more than the pinned file
    root = write_tree(tmp_path / "splits", {**files, "pascal/val.txt": val})
    src = PublishedSource("pascal", root=root, md5s=pinned)
    with pytest.raises(DataError) as e:
        make_splits(lists, tmp_path / "out", "classic", ["3"], source="published", published=src)
    assert str(e.value) == (
        f"{root / 'pascal' / 'val.txt'}: checksum mismatch (expected md5 {pinned['pascal/val.txt']}, got "
        f"{md5(val)}): not the published pascal/val.txt of LiheYoung/UniMatch@{pub.COMMIT}"
    )
    assert not (tmp_path / "out").exists()
    (root / "pascal" / "val.txt").write_bytes(files["pascal/val.txt"])
    (root / "pascal" / "3" / "unlabeled.txt").unlink()
    with pytest.raises(DataError, match=r"3/unlabeled.txt: published split list file not found"):
        make_splits(lists, tmp_path / "out", "classic", ["3"], source="published", published=src)


def test_published_id_missing_from_the_prepared_dataset_is_named(lists, tmp_path):
    files = published_files(lists)
    alien = line("2012_999999")
    files["pascal/3/unlabeled.txt"] += f"\n{alien}".encode()
    root = write_tree(tmp_path / "splits", files)
    out = tmp_path / "out"
    make_splits(lists, out, "blended", ["1_4"])
    before = snapshot(out)
    src = PublishedSource(
        "pascal", root=root, md5s=table(files)
    )  # the checksum holds: right file, wrong data
    with pytest.raises(DataError) as e:
        make_splits(lists, out, "classic", ["3"], source="published", published=src, root=lists.parent)
    assert str(e.value) == (
        f"{root / 'pascal' / '3' / 'unlabeled.txt'}: 1 listed items are not in the prepared dataset "
        f"({lists / 'train.txt'}, 40 train items), e.g. {alien!r}"
    )
    assert snapshot(out) == before


def test_split_the_pin_does_not_know_fails_before_any_request(lists, tmp_path):
    with LocalServer() as srv:
        src = PublishedSource.for_kind("voc", url=srv.url, cache=tmp_path / "cache")
        with pytest.raises(DataError) as e:
            make_splits(lists, tmp_path / "out", "blended", ["1_8", "1_2"], source="published", published=src)
        assert Handler.requests == []
    assert str(e.value).startswith(
        f"pascal/1_2/labeled.txt: not a pinned list of LiheYoung/UniMatch@{pub.COMMIT}"
    )
    assert "pinned pascal splits: 92, 183, 366, 732, 1464, 1_16, 1_8, 1_4" in str(e.value)
    assert "source: generate" in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_published_source_is_rejected_for_a_synthetic_dataset(tmp_path):
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    raw["datasets"]["synthetic"]["protocols"]["blended"]["source"] = "published"
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"datasets.synthetic.protocols.blended.source"):
        load_params(tmp_path / "p.yaml")


# ----------------------------------------------------------------------------- the stage (CLI)


def test_stage_exits_2_with_one_line_and_keeps_the_previous_splits(tmp_path, monkeypatch, capsys):
    """`dssn splits voc` with a tampered published list (served at the pinned path): exit 2, one line."""
    ids = [f"2008_{i:06d}" for i in range(120)]
    prepared = tmp_path / "data" / "prepared" / "voc"
    for i in [*ids, "2007_000001"]:
        for rel in line(i).split():
            (prepared / rel).parent.mkdir(parents=True, exist_ok=True)
            (prepared / rel).write_bytes(b"x")
    write_list(prepared / "lists" / "train.txt", [line(i) for i in ids])
    write_list(prepared / "lists" / "train_fine.txt", [line(i) for i in ids[:100]])
    write_list(prepared / "lists" / "val.txt", [line("2007_000001")])
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    raw["datasets"] = {"voc": {"kind": "voc", "num_classes": 21, "protocols": {"classic": {"names": ["92"]}}}}
    raw["studies"], raw["sweeps"] = {}, {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert cli_main(["splits", "voc"]) == 0  # generated
    out = tmp_path / "data" / "splits" / "voc"
    before = snapshot(out)
    with LocalServer() as srv:
        srv.add("/pascal/val.txt", "\n".join(line(i) for i in ids).encode())  # wrong file: md5 will not match
        raw["datasets"]["voc"]["protocols"]["classic"].update(source="published", published_url=srv.url)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        capsys.readouterr()
        assert cli_main(["splits", "voc"]) == 2
    last = (
        capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    )  # (above it: progress bars, the retry warning)
    assert last.startswith("error: published split list pascal/val.txt: checksum mismatch after a fresh")
    assert f"expected md5 {pub.MD5['pascal/val.txt']}" in last
    assert snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["voc"]  # no temp folders left


# ----------------------------------------------------------------------------- the real lists


@needs_lists
def test_pinned_lists_from_a_local_copy_and_a_missing_id(tmp_path):
    """The real published VOC lists through the pinned table, offline; then a dataset lacking one id."""
    pascal = UNIMATCH / "pascal"
    lists = tmp_path / "lists"
    write_list(lists / "train.txt", sorted(read_list(pascal / "train_aug.txt")))
    write_list(lists / "val.txt", sorted(read_list(pascal / "val.txt")))
    write_list(lists / "train_fine.txt", sorted(read_list(pascal / "1464" / "labeled.txt")))
    src = PublishedSource.for_kind("voc", root=UNIMATCH)
    info = make_splits(lists, tmp_path / "c", "classic", ["92", "1464"], source="published", published=src)
    for split in ("92", "1464"):
        for name in ("labeled.txt", "unlabeled.txt"):
            assert read_list(tmp_path / "c" / split / name) == read_list(pascal / split / name)
        assert info[split]["published"]["md5"]["labeled.txt"] == pub.MD5[f"pascal/{split}/labeled.txt"]
    assert read_list(tmp_path / "c" / "val.txt") == read_list(pascal / "val.txt")
    gone = read_list(pascal / "92" / "unlabeled.txt")[5]
    write_list(lists / "train.txt", [x for x in read_list(lists / "train.txt") if x != gone])
    with pytest.raises(
        DataError, match=rf"92/unlabeled.txt: 1 listed items are not in the prepared .*{gone}"
    ):
        make_splits(lists, tmp_path / "c", "classic", ["92"], source="published", published=src)
    assert read_list(tmp_path / "c" / "92" / "unlabeled.txt") == read_list(pascal / "92" / "unlabeled.txt")


@needs_lists
def test_generated_blended_1_2_is_the_cps_list(tmp_path):
    """UniMatch has no pascal 1_2; the CPS rule through make_splits gives CPS's train_aug_*_1-2 ids, in order."""
    lists = tmp_path / "lists"
    write_list(lists / "train.txt", read_list(UNIMATCH / "pascal" / "train_aug.txt")[::-1])
    write_list(lists / "val.txt", read_list(UNIMATCH / "pascal" / "val.txt"))
    make_splits(lists, tmp_path / "out", "blended", ["1_2"])
    sub = CPS / "pascal_voc" / "subset_train_aug"
    for name in ("labeled", "unlabeled"):
        ids = [x.split()[0].removeprefix("JPEGImages/").removesuffix(".jpg") for x in
               read_list(tmp_path / "out" / "1_2" / f"{name}.txt")]  # fmt: skip
        assert ids == read_list(sub / f"train_aug_{name}_1-2.txt")
        assert len(ids) == 5291
