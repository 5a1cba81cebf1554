"""Download, verify and safely extract PASCAL VOC 2012, SBD and Cityscapes.

Downloads resume (HTTP Range) into `<file>.part` with a progress bar and are renamed into place
only after the checksum matches; a mismatch re-downloads once, then fails naming the file.
Extraction rejects members that would escape the target and happens in a temp folder renamed
into place. Offline: point params at an archive (verified, extracted) or an extracted tree
(layout verified). Cityscapes credentials are never printed, logged or written anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import requests
from torchvision.datasets.utils import calculate_md5
from tqdm import tqdm

from pipeline.data.errors import DataError

VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
SBD_URL = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_MD5 = "82b4d87ceb2ed10f6038a1cba92111cb"
CITYSCAPES_URL = "https://www.cityscapes-dataset.com"
CITYSCAPES_PACKAGES = {"gtFine_trainvaltest.zip": (1, "4237c19de34c8a376e9ba46b495d6f66"),
                       "leftImg8bit_trainvaltest.zip": (3, "0a6e97e94b616a514066c9e2adb0c97f")}
CHUNK = 1 << 20


def _stream(session: requests.Session, url: str, part: Path, resume: bool) -> None:
    have = part.stat().st_size if (resume and part.exists()) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, stream=True, headers=headers, timeout=60, allow_redirects=True) as r:
        if r.status_code == 416:  # already complete
            return
        if r.status_code not in (200, 206):
            raise DataError(f"{url}: HTTP {r.status_code} while downloading {part.name.removesuffix('.part')}")
        if r.status_code == 200:
            have = 0  # the server ignored Range: start over
        total = int(r.headers.get("Content-Length", 0)) + have
        with open(part, "ab" if have else "wb") as f, tqdm(total=total or None, initial=have, unit="B",
                                                          unit_scale=True, desc=part.name, mininterval=1) as bar:
            for chunk in r.iter_content(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))


def download(url: str, dest: Path, md5: str | None = None, sha256: str | None = None,
             session: requests.Session | None = None, resume: bool = True) -> Path:
    """`url` -> `dest`, verified; an existing file with the right checksum is kept as it is."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and _matches(dest, md5, sha256):
        return dest
    session = session or requests.Session()
    part = dest.with_name(dest.name + ".part")
    for attempt in (1, 2):
        _stream(session, url, part, resume=resume and attempt == 1)
        if _matches(part, md5, sha256):
            os.replace(part, dest)
            return dest
        actual = calculate_md5(str(part)) if md5 else _sha256(part)
        part.unlink()
        if attempt == 2:
            raise DataError(f"{dest.name}: checksum mismatch after a fresh re-download from {url} "
                            f"(expected {'md5 ' + md5 if md5 else 'sha256 ' + str(sha256)}, got {actual})")
    raise AssertionError("unreachable")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _matches(path: Path, md5: str | None, sha256: str | None) -> bool:
    if md5 and calculate_md5(str(path)) != md5:
        return False
    return not (sha256 and _sha256(path) != sha256)


def _safe_member(name: str, target: Path) -> Path:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise DataError(f"archive member {name!r} would escape the target folder")
    dest = (target / p).resolve()
    if target.resolve() not in (dest, *dest.parents):
        raise DataError(f"archive member {name!r} would escape the target folder")
    return dest


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract tar/tgz/zip into `dest` (atomically); unsafe or corrupt archives raise DataError."""
    archive, dest = Path(archive), Path(dest)
    tmp = dest.parent / f".tmp-extract-{dest.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                bad = z.testzip()
                if bad is not None:
                    raise DataError(f"{archive}: corrupt member {bad!r}")
                for info in z.infolist():
                    _safe_member(info.filename, tmp)
                z.extractall(tmp)
        else:
            try:
                with tarfile.open(archive) as t:
                    members = t.getmembers()
                    for m in members:
                        _safe_member(m.name, tmp)
                        if m.issym() or m.islnk():
                            link = Path(m.linkname)
                            base = Path(m.name).parent if m.issym() else Path()
                            if link.is_absolute() or ".." in (base / link).parts and not _inside(tmp, base / link):
                                raise DataError(f"archive member {m.name!r} links outside the target ({m.linkname})")
                        elif not (m.isfile() or m.isdir()):
                            raise DataError(f"archive member {m.name!r} is not a regular file or folder")
                    t.extractall(tmp, members=members, filter="data")
            except (tarfile.TarError, EOFError, OSError) as e:
                raise DataError(f"{archive}: truncated or corrupt archive ({e})") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def _inside(root: Path, rel: Path) -> bool:
    target = (root / rel).resolve()
    return root.resolve() in (target, *target.parents)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: expected {what}")
    return path


def fetch_voc(dest: Path, url: str = VOC_URL, md5: str = VOC_MD5, archive: Path | None = None,
              extracted: Path | None = None) -> Path:
    """The `VOCdevkit/VOC2012` folder (download, or verify an archive / tree you already have)."""
    if extracted is not None:
        root = Path(extracted)
        root = root / "VOCdevkit" / "VOC2012" if (root / "VOCdevkit").exists() else root
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation/train.txt",
                    "ImageSets/Segmentation/val.txt"):
            _require(root / sub, f"{sub} of PASCAL VOC 2012 (datasets.voc.source.extracted)")
        return root
    dest = Path(dest)
    tar = Path(archive) if archive is not None else dest / "VOCtrainval_11-May-2012.tar"
    if archive is not None:
        if not tar.exists():
            raise DataError(f"{tar}: archive not found (datasets.voc.source.archive)")
        if calculate_md5(str(tar)) != md5:
            raise DataError(f"{tar}: md5 is not {md5} — not the official VOCtrainval_11-May-2012.tar")
    else:
        download(url, tar, md5=md5)
    out = safe_extract(tar, dest / "voc")
    return _require(out / "VOCdevkit" / "VOC2012", "VOCdevkit/VOC2012 inside the VOC archive")


def fetch_sbd(dest: Path, url: str = SBD_URL, md5: str = SBD_MD5, archive: Path | None = None,
              extracted: Path | None = None) -> Path:
    """SBD's `benchmark_RELEASE/dataset` folder (cls/*.mat, train.txt, val.txt)."""
    if extracted is not None:
        root = Path(extracted)
        root = root / "benchmark_RELEASE" / "dataset" if (root / "benchmark_RELEASE").exists() else root
        for sub in ("cls", "train.txt", "val.txt"):
            _require(root / sub, f"{sub} of SBD (datasets.voc.source.sbd_extracted)")
        return root
    dest = Path(dest)
    tgz = Path(archive) if archive is not None else dest / "benchmark.tgz"
    if archive is not None:
        if not tgz.exists():
            raise DataError(f"{tgz}: archive not found (datasets.voc.source.sbd_archive)")
        if calculate_md5(str(tgz)) != md5:
            raise DataError(f"{tgz}: md5 is not {md5} — not the official SBD benchmark.tgz")
    else:
        download(url, tgz, md5=md5)
    out = safe_extract(tgz, dest / "sbd")
    return _require(out / "benchmark_RELEASE" / "dataset", "benchmark_RELEASE/dataset inside benchmark.tgz")


def cityscapes_credentials(username: str | None = None, password: str | None = None) -> tuple[str, str]:
    """Args, then CITYSCAPES_USERNAME/PASSWORD, then cityscapesscripts' credentials.json."""
    username = username or os.environ.get("CITYSCAPES_USERNAME")
    password = password or os.environ.get("CITYSCAPES_PASSWORD")
    if username and password:
        return username, password
    cred = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local/share")) / "cityscapesscripts/credentials.json"
    if cred.exists():
        data = json.loads(cred.read_text())
        return data["username"], data["password"]
    raise DataError("Cityscapes needs an account: set CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD (or "
                    f"cityscapesscripts' {cred}), or point datasets.cityscapes.source at downloaded zips")


def cityscapes_session(base_url: str, username: str, password: str) -> requests.Session:
    """Log in as csDownload does: POST /login/ answered by a 302 means success."""
    s = requests.Session()
    s.get(f"{base_url}/login/", allow_redirects=False, timeout=60)
    r = s.post(f"{base_url}/login/", data={"username": username, "password": password, "submit": "Login"},
               allow_redirects=False, timeout=60)
    if r.status_code != 302:
        raise DataError(f"Cityscapes login failed at {base_url}/login/ (HTTP {r.status_code}): check "
                        "CITYSCAPES_USERNAME / CITYSCAPES_PASSWORD")
    return s


def fetch_cityscapes(dest: Path, packages: tuple[str, ...] = tuple(CITYSCAPES_PACKAGES),
                     base_url: str = CITYSCAPES_URL, username: str | None = None, password: str | None = None,
                     archives: dict[str, Path] | None = None, extracted: Path | None = None) -> Path:
    """A Cityscapes root with `leftImg8bit/` and `gtFine/` (download through the login, or offline)."""
    if extracted is not None:
        root = Path(extracted)
        for sub in ("leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val"):
            _require(root / sub, f"{sub} of Cityscapes (datasets.cityscapes.source.extracted)")
        return root
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    session = None
    zips = []
    for name in packages:
        package_id, md5 = CITYSCAPES_PACKAGES[name]
        if archives is not None:
            z = Path(archives[name])
            if not z.exists():
                raise DataError(f"{z}: Cityscapes archive not found (datasets.cityscapes.source.archive)")
            if calculate_md5(str(z)) != md5:
                raise DataError(f"{z}: md5 is not {md5} — not the official {name}")
        else:
            if session is None:
                session = cityscapes_session(base_url, *cityscapes_credentials(username, password))
            z = download(f"{base_url}/file-handling/?packageID={package_id}", dest / name, md5=md5,
                         session=session)
        zips.append(z)
    root = dest / "cityscapes"
    root.mkdir(exist_ok=True)
    for z in zips:
        part = safe_extract(z, dest / f"extract-{z.stem}")
        for child in part.iterdir():
            target = root / child.name
            if target.exists() and child.is_dir():
                shutil.rmtree(target)
            os.replace(child, target)
        shutil.rmtree(part)
    return fetch_cityscapes(dest, extracted=root)
