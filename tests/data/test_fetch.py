"""fetch: downloads from a server on 127.0.0.1, checksums, resume, safe extraction, Cityscapes login."""

import hashlib
import io
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
    monkeypatch.setattr(fetch, "CITYSCAPES_PACKAGES", {"gtFine_trainvaltest.zip": (1, md5(gt.read_bytes())),
                                                       "leftImg8bit_trainvaltest.zip": (3, md5(left.read_bytes()))})
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
