"""fetch: downloads from a server on 127.0.0.1, checksums, resume, safe extraction, Cityscapes login."""

import hashlib
import io
import json
import tarfile
import zipfile

import pytest

from pipeline.data import fetch
from pipeline.data.errors import DataError
from tests.data.builders import cityscapes_zips, tar_of, voc_tree
from tests.data.server import PASSWORD, USER, Handler, LocalServer


def md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_download_verifies_and_resumes(tmp_path):
    data = bytes(range(256)) * 4000
    with LocalServer() as srv:
        url = srv.add("/f.bin", data)
        part = tmp_path / "f.bin.part"
        part.write_bytes(data[:1000])  # an interrupted earlier download
        out = fetch.download(url, tmp_path / "f.bin", md5=md5(data))
        assert out.read_bytes() == data and not part.exists()
        assert Handler.requests == ["/f.bin"]
        fetch.download(url, tmp_path / "f.bin", md5=md5(data))  # already there and valid: no request
        assert len(Handler.requests) == 1


def test_checksum_mismatch_redownloads_once_then_fails(tmp_path):
    data = b"x" * 5000
    with LocalServer() as srv:
        url = srv.add("/a.tar", data)
        Handler.corrupt_once.add("/a.tar")
        assert fetch.download(url, tmp_path / "a.tar", md5=md5(data)).read_bytes() == data
        assert len(Handler.requests) == 2  # the corrupt copy was fetched again, once
        with pytest.raises(DataError, match=r"b.tar: checksum mismatch .*expected md5 0+, got [0-9a-f]{32}"):
            fetch.download(srv.add("/b.tar", data), tmp_path / "b.tar", md5="0" * 32)
        assert not (tmp_path / "b.tar").exists() and not (tmp_path / "b.tar.part").exists()


def _tar_with(tmp_path, name, member: tarfile.TarInfo, payload=b"bad"):
    path = tmp_path / name
    with tarfile.open(path, "w") as t:
        t.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return path


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil.txt", "ok/../../evil.txt"])
def test_path_traversal_members_are_rejected(tmp_path, member):
    info = tarfile.TarInfo(member)
    info.size = 3
    with pytest.raises(DataError, match="escape"):
        fetch.safe_extract(_tar_with(tmp_path, "t.tar", info), tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out").exists()


def test_links_outside_and_zip_traversal_are_rejected(tmp_path):
    link = tarfile.TarInfo("data/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(DataError, match="links outside"):
        fetch.safe_extract(_tar_with(tmp_path, "l.tar", link), tmp_path / "out")
    z = tmp_path / "z.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("../../evil.txt", "x")
    with pytest.raises(DataError, match="escape"):
        fetch.safe_extract(z, tmp_path / "out")


def test_truncated_archive_is_reported_and_output_untouched(tmp_path):
    voc, _ = voc_tree(tmp_path / "raw")
    tar = tar_of(tmp_path / "raw" / "VOCdevkit", tmp_path / "voc.tar", "VOCdevkit")
    good = fetch.safe_extract(tar, tmp_path / "out")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.tar: truncated or corrupt"):
        fetch.safe_extract(cut, tmp_path / "out")
    assert (good / "VOCdevkit" / "VOC2012" / "ImageSets").exists()


def test_fetch_voc_and_sbd_over_http_and_offline(tmp_path):
    voc_tree(tmp_path / "raw")
    tar = tar_of(tmp_path / "raw" / "VOCdevkit", tmp_path / "VOC.tar", "VOCdevkit")
    tgz = tar_of(tmp_path / "raw" / "benchmark_RELEASE", tmp_path / "benchmark.tgz", "benchmark_RELEASE")
    with LocalServer() as srv:
        root = fetch.fetch_voc(tmp_path / "dl", url=srv.add("/voc.tar", tar), md5=md5(tar.read_bytes()))
        sbd = fetch.fetch_sbd(tmp_path / "dl", url=srv.add("/b.tgz", tgz), md5=md5(tgz.read_bytes()))
    assert (root / "ImageSets" / "Segmentation" / "train.txt").exists()
    assert (sbd / "cls" / "2008_000010.mat").exists()
    offline = fetch.fetch_voc(tmp_path / "off", archive=tar, md5=md5(tar.read_bytes()))
    assert (offline / "JPEGImages").is_dir()
    assert fetch.fetch_voc(tmp_path / "x", extracted=tmp_path / "raw") == tmp_path / "raw/VOCdevkit/VOC2012"
    with pytest.raises(DataError, match="md5 is not"):
        fetch.fetch_voc(tmp_path / "off2", archive=tar)  # not the official archive
    with pytest.raises(DataError, match="expected JPEGImages of PASCAL VOC"):
        fetch.fetch_voc(tmp_path / "x", extracted=tmp_path / "dl")


def test_cityscapes_login_flow_and_wrong_credentials(tmp_path, monkeypatch):
    gt, left = cityscapes_zips(tmp_path / "zips")
    monkeypatch.setattr(
        fetch,
        "CITYSCAPES_PACKAGES",
        {
            "gtFine_trainvaltest.zip": (1, md5(gt.read_bytes())),
            "leftImg8bit_trainvaltest.zip": (3, md5(left.read_bytes())),
        },
    )
    monkeypatch.setenv("CITYSCAPES_USERNAME", USER)
    monkeypatch.setenv("CITYSCAPES_PASSWORD", "wrong-" + PASSWORD)
    with LocalServer() as srv:
        Handler.packages = {1: (gt.name, gt.read_bytes()), 3: (left.name, left.read_bytes())}
        with pytest.raises(DataError) as err:
            fetch.fetch_cityscapes(tmp_path / "cs", base_url=srv.url)
        assert "login failed" in str(err.value) and PASSWORD not in str(err.value)
        monkeypatch.setenv("CITYSCAPES_PASSWORD", PASSWORD)
        root = fetch.fetch_cityscapes(tmp_path / "cs", base_url=srv.url)
    assert (root / "gtFine" / "train" / "aachen").is_dir() and (root / "leftImg8bit" / "val").is_dir()
    offline = fetch.fetch_cityscapes(tmp_path / "cs2", archives={gt.name: gt, left.name: left})
    assert (offline / "leftImg8bit" / "train").is_dir()


def test_interrupted_download_keeps_part_and_resumes(tmp_path):
    data = bytes(range(256)) * 2000
    with LocalServer() as srv:
        url = srv.add("/big.tar", data)
        Handler.cut_once.add("/big.tar")
        with pytest.raises(DataError, match="big.tar: download from .* failed .*run again to resume"):
            fetch.download(url, tmp_path / "big.tar", md5=md5(data))
        part = tmp_path / "big.tar.part"
        assert 0 < part.stat().st_size < len(data)
        have = part.stat().st_size
        assert fetch.download(url, tmp_path / "big.tar", md5=md5(data)).read_bytes() == data
        assert Handler.ranges[-1] == f"bytes={have}-"  # the second request asked only for the rest


def test_server_ignoring_range_restarts_from_zero(tmp_path):
    data = b"0123456789" * 3000
    with LocalServer() as srv:
        url = srv.add("/n.bin", data)
        Handler.no_range.add("/n.bin")
        (tmp_path / "n.bin.part").write_bytes(b"junk" * 10)
        assert (
            fetch.download(url, tmp_path / "n.bin", sha256=hashlib.sha256(data).hexdigest()).read_bytes()
            == data
        )


def test_http_error_and_missing_server_are_data_errors(tmp_path):
    with LocalServer() as srv:
        with pytest.raises(DataError, match="x.tar: HTTP 404"):
            fetch.download(srv.url + "/nothing", tmp_path / "x.tar")
        port = srv.httpd.server_address[1]
    with pytest.raises(DataError, match="y.tar: download from"):
        fetch.download(f"http://127.0.0.1:{port}/y", tmp_path / "y.tar")  # server gone


def test_link_members_outside_are_rejected_inside_are_kept(tmp_path):
    for name, kind, target in [
        ("a/rel", tarfile.SYMTYPE, "../../outside"),
        ("a/hard", tarfile.LNKTYPE, "../outside"),
        ("a/abs", tarfile.SYMTYPE, "/tmp"),
    ]:
        m = tarfile.TarInfo(name)
        m.type, m.linkname = kind, target
        with pytest.raises(DataError, match="links outside"):
            fetch.safe_extract(_tar_with(tmp_path, "l.tar", m), tmp_path / "out")
    fifo = tarfile.TarInfo("a/fifo")
    fifo.type = tarfile.FIFOTYPE
    with pytest.raises(DataError, match="not a regular file"):
        fetch.safe_extract(_tar_with(tmp_path, "f.tar", fifo), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    path = tmp_path / "ok.tar"
    with tarfile.open(path, "w") as t:
        f = tarfile.TarInfo("d/file.txt")
        f.size = 2
        t.addfile(f, io.BytesIO(b"hi"))
        s = tarfile.TarInfo("d/sub/link")
        s.type, s.linkname = tarfile.SYMTYPE, "../file.txt"
        t.addfile(s)
    out = fetch.safe_extract(path, tmp_path / "out")
    assert (out / "d" / "sub" / "link").read_text() == "hi"


def test_corrupt_archives_of_every_kind(tmp_path):
    voc_tree(tmp_path / "raw")
    tgz = tar_of(tmp_path / "raw" / "VOCdevkit", tmp_path / "v.tgz", "VOCdevkit")
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(tgz.read_bytes()[: tgz.stat().st_size - 200])
    with pytest.raises(DataError, match="cut.tgz: truncated or corrupt"):
        fetch.safe_extract(cut, tmp_path / "out")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is no archive at all" * 10)
    with pytest.raises(DataError, match="junk.zip: truncated or corrupt"):
        fetch.safe_extract(junk, tmp_path / "out")
    z = tmp_path / "crc.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("a.txt", b"A" * 1000)
    raw = bytearray(z.read_bytes())
    raw[raw.index(b"A" * 100) + 50] = ord("B")  # payload no longer matches its CRC
    z.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="crc.zip: truncated or corrupt"):
        fetch.safe_extract(z, tmp_path / "out")
    with pytest.raises(DataError, match="nope.tar: archive not found"):
        fetch.safe_extract(tmp_path / "nope.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_extraction_is_skipped_when_already_done(tmp_path):
    voc_tree(tmp_path / "raw")
    tar = tar_of(tmp_path / "raw" / "VOCdevkit", tmp_path / "VOC.tar", "VOCdevkit")
    a = fetch.fetch_voc(tmp_path / "d", archive=tar, md5=md5(tar.read_bytes()))
    ino = (a / "ImageSets" / "Segmentation" / "train.txt").stat().st_ino
    b = fetch.fetch_voc(tmp_path / "d", archive=tar, md5=md5(tar.read_bytes()))
    assert a == b and (b / "ImageSets" / "Segmentation" / "train.txt").stat().st_ino == ino


def test_sbd_offline_layouts_and_counts(tmp_path):
    voc_tree(tmp_path / "raw")
    tgz = tar_of(tmp_path / "raw" / "benchmark_RELEASE", tmp_path / "benchmark.tgz", "benchmark_RELEASE")
    sbd = fetch.fetch_sbd(tmp_path / "d", archive=tgz, md5=md5(tgz.read_bytes()))
    assert sbd == tmp_path / "d" / "sbd" / "benchmark_RELEASE" / "dataset"
    for given in (tmp_path / "raw", tmp_path / "raw" / "benchmark_RELEASE", sbd):
        assert fetch.fetch_sbd(tmp_path / "x", extracted=given).name == "dataset"
    with pytest.raises(DataError, match="md5 is not .* not the official SBD"):
        fetch.fetch_sbd(tmp_path / "y", archive=tgz)
    with pytest.raises(DataError, match=r"train.txt: 2 entries, but the official SBD has 8498"):
        fetch.fetch_sbd(tmp_path / "x", extracted=sbd, counts=fetch.SBD_COUNTS)
    with pytest.raises(DataError, match=r"train.txt: 2 entries, but the official PASCAL VOC 2012 has 1464"):
        fetch.fetch_voc(tmp_path / "x", extracted=tmp_path / "raw", counts=fetch.VOC_COUNTS)
    with pytest.raises(DataError, match="missing.tgz: archive not found"):
        fetch.fetch_sbd(tmp_path / "z", archive=tmp_path / "missing.tgz")


def _cityscapes_server(tmp_path, monkeypatch, md5_known: bool = True):
    gt, left = cityscapes_zips(tmp_path / "zips")
    known = {n: md5(p.read_bytes()) if md5_known else "0" * 32 for n, p in ((gt.name, gt), (left.name, left))}
    monkeypatch.setattr(
        fetch,
        "CITYSCAPES_PACKAGES",
        {gt.name: (1, known[gt.name]), left.name: (3, known[left.name])},
    )
    Handler.packages = {1: (gt.name, gt.read_bytes()), 3: (left.name, left.read_bytes())}
    return gt, left


def test_cityscapes_password_never_leaks(tmp_path, monkeypatch, capsys, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv("CITYSCAPES_USERNAME", raising=False)
    monkeypatch.delenv("CITYSCAPES_PASSWORD", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    with LocalServer() as srv:
        _cityscapes_server(tmp_path, monkeypatch)
        with pytest.raises(DataError, match="CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD"):
            fetch.fetch_cityscapes(tmp_path / "cs", base_url=srv.url)
        cred = tmp_path / "xdg" / "cityscapesscripts" / "credentials.json"
        cred.parent.mkdir(parents=True)
        cred.write_text('{"username": "alice", "pass' + PASSWORD)  # malformed
        with pytest.raises(DataError, match="credentials.json: expected JSON") as e1:
            fetch.fetch_cityscapes(tmp_path / "cs", base_url=srv.url)
        cred.write_text(json.dumps({"username": USER, "password": PASSWORD[::-1]}))
        with pytest.raises(
            DataError, match="Cityscapes login failed .*HTTP 200.*check CITYSCAPES_USERNAME"
        ) as e2:
            fetch.fetch_cityscapes(tmp_path / "cs", base_url=srv.url)
        with pytest.raises(DataError, match="login failed") as e3:
            fetch.fetch_cityscapes(tmp_path / "cs", base_url=srv.url, username=USER, password="x" + PASSWORD)
        cred.write_text(json.dumps({"username": USER, "password": PASSWORD}))  # cityscapesscripts' file
        root = fetch.fetch_cityscapes(tmp_path / "cs", base_url=srv.url)
    assert (root / "gtFine" / "val" / "frankfurt").is_dir() and (root / "README").is_file()
    out = capsys.readouterr()
    for text in (
        str(e1.value),
        str(e2.value),
        str(e3.value),
        repr(e3.value.__cause__),
        out.out,
        out.err,
        caplog.text,
    ):
        assert PASSWORD not in text and PASSWORD[::-1] not in text


def test_cityscapes_uses_the_md5_endpoint_and_the_session_cookie(tmp_path, monkeypatch):
    import requests

    monkeypatch.setenv("CITYSCAPES_USERNAME", USER)
    monkeypatch.setenv("CITYSCAPES_PASSWORD", PASSWORD)
    with LocalServer() as srv:
        gt, _ = _cityscapes_server(tmp_path, monkeypatch, md5_known=False)  # only the endpoint is right
        root = fetch.fetch_cityscapes(tmp_path / "cs", base_url=srv.url)
        assert any(r.startswith("/md5-sum/?packageID=1") for r in Handler.requests)
        assert fetch.cityscapes_layout(root) == root
        with pytest.raises(DataError, match="HTTP 302"):  # no login cookie: redirected, never saved
            fetch.download(
                f"{srv.url}/file-handling/?packageID=1",
                tmp_path / "anon.zip",
                session=requests.Session(),
                allow_redirects=False,
            )
    assert not (tmp_path / "anon.zip").exists()
    with pytest.raises(DataError, match="md5 is not 0+ — not the official gtFine_trainvaltest.zip"):
        fetch.fetch_cityscapes(tmp_path / "off", archives={gt.name: gt, "leftImg8bit_trainvaltest.zip": gt})
    with pytest.raises(DataError, match="archive for leftImg8bit_trainvaltest.zip not given"):
        fetch.fetch_cityscapes(tmp_path / "off", archives={gt.name: gt}, md5s={gt.name: md5(gt.read_bytes())})
    with pytest.raises(DataError, match="leftImg8bit/train of Cityscapes"):
        fetch.fetch_cityscapes(tmp_path / "off", extracted=tmp_path / "zips")
