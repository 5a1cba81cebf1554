"""Download, verify and safely extract PASCAL VOC 2012, SBD and Cityscapes.

Downloads resume (HTTP Range) into `<file>.part` with a progress bar and are renamed into place
only after the checksum matches; a mismatch re-downloads once from scratch, then fails naming the
file and both checksums. Extraction rejects members that would escape the target (absolute paths,
`..`, links pointing outside) and happens in a temp folder renamed into place. Offline: point at
an archive (checksum verified, then extracted) or an extracted tree (layout verified).
Cityscapes credentials are never printed, logged or put into any message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import requests
from torchvision.datasets.utils import calculate_md5
from tqdm import tqdm

from pipeline.data.errors import DataError
from pipeline.io import replace_dir

log = logging.getLogger(__name__)

# datasets.md §1 (torchvision voc.py / sbd.py, datasets-mila annex keys).
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_MD5 = "6cd6e144f989b92b3379bac3b3de84fd"
VOC_SHA256 = "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb"
VOC_SIZE = 1_999_639_040
SBD_URL = "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"
SBD_MD5 = "82b4d87ceb2ed10f6038a1cba92111cb"
SBD_SHA256 = "6a5a2918d5c73ce032fdeba876574d150d9d04113ab87540a1304cbcc715be53"
CITYSCAPES_URL = "https://www.cityscapes-dataset.com"
# name -> (packageID, md5)
CITYSCAPES_PACKAGES = {
    "gtFine_trainvaltest.zip": (1, "4237c19de34c8a376e9ba46b495d6f66"),
    "leftImg8bit_trainvaltest.zip": (3, "0a6e97e94b616a514066c9e2adb0c97f"),
}
# Known sizes of the official releases; pass them as `counts=` to make a partial tree an error.
VOC_COUNTS = {"ImageSets/Segmentation/train.txt": 1464, "ImageSets/Segmentation/val.txt": 1449}
SBD_COUNTS = {"train.txt": 8498, "val.txt": 2857}
CITYSCAPES_COUNTS = {"leftImg8bit/train": 2975, "leftImg8bit/val": 500}
CHUNK = 1 << 20
TIMEOUT = 60
_MARKER = ".extracted.json"


# ----------------------------------------------------------------------------- download


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksum_error(path: Path, md5: str | None, sha256: str | None) -> str | None:
    """None when the file matches every given checksum, else 'expected X, got Y'."""
    if md5:
        got = calculate_md5(str(path))
        if got != md5.lower():
            return f"expected md5 {md5}, got {got}"
    if sha256:
        got = _sha256(path)
        if got != sha256.lower():
            return f"expected sha256 {sha256}, got {got}"
    return None


def _stream(session: requests.Session, url: str, part: Path, resume: bool, allow_redirects: bool) -> None:
    have = part.stat().st_size if (resume and part.exists()) else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    name = part.name.removesuffix(".part")
    try:
        with session.get(
            url, stream=True, headers=headers, timeout=TIMEOUT, allow_redirects=allow_redirects
        ) as r:
            if r.status_code == 416 and have:  # nothing left to fetch: the part is complete
                return
            if r.status_code not in (200, 206):
                raise DataError(f"{name}: HTTP {r.status_code} from {url}")
            if r.status_code == 200:
                have = 0  # the server ignored Range: start over
            total = int(r.headers.get("Content-Length", 0)) + have
            with (
                open(part, "ab" if have else "wb") as f,
                tqdm(
                    total=total or None, initial=have, unit="B", unit_scale=True, desc=name, mininterval=1
                ) as bar,
            ):
                for chunk in r.iter_content(1 << 16):  # small: an interrupted transfer keeps most bytes
                    f.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as e:
        # The .part stays, so the next call resumes where this one stopped.
        raise DataError(
            f"{name}: download from {url} failed ({type(e).__name__}); run again to resume"
        ) from e


def download(
    url: str,
    dest: Path,
    md5: str | None = None,
    sha256: str | None = None,
    session: requests.Session | None = None,
    resume: bool = True,
    allow_redirects: bool = True,
) -> Path:
    """`url` -> `dest`, verified; a file already there with the right checksum is kept without a request."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and _checksum_error(dest, md5, sha256) is None:
        return dest  # nothing to verify against, or verified: no request
    session = session or requests.Session()
    part = dest.with_name(dest.name + ".part")
    for attempt in (1, 2):
        _stream(session, url, part, resume=resume and attempt == 1, allow_redirects=allow_redirects)
        problem = _checksum_error(part, md5, sha256)
        if problem is None:
            os.replace(part, dest)
            return dest
        part.unlink()
        if attempt == 1:
            log.warning("%s: checksum mismatch (%s); downloading it again from scratch", dest.name, problem)
        else:
            raise DataError(
                f"{dest.name}: checksum mismatch after a fresh re-download from {url} ({problem})"
            )
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- extraction


def _inside(root: Path, target: Path) -> bool:
    root, target = root.resolve(), target.resolve()
    return target == root or root in target.parents


def _check_name(name: str, root: Path, archive: Path) -> None:
    p = Path(name)
    if (
        not name
        or p.is_absolute()
        or name.startswith(("/", "\\"))
        or ".." in p.parts
        or not _inside(root, root / p)
    ):
        raise DataError(f"{archive}: member {name!r} would escape the extraction folder")


def _check_tar(t: tarfile.TarFile, root: Path, archive: Path) -> None:
    for m in t.getmembers():
        _check_name(m.name, root, archive)
        if m.issym() or m.islnk():
            # symlinks resolve from the member's folder, hard links from the archive root
            base = root / Path(m.name).parent if m.issym() else root
            if Path(m.linkname).is_absolute() or not _inside(root, base / m.linkname):
                raise DataError(
                    f"{archive}: member {m.name!r} links outside the extraction folder ({m.linkname})"
                )
        elif not (m.isfile() or m.isdir()):
            raise DataError(f"{archive}: member {m.name!r} is not a regular file, folder or link")


def _extract_into(archive: Path, root: Path) -> None:
    """Extract every member of `archive` into the existing folder `root` (merging), after checking all."""
    if not archive.is_file():
        raise DataError(f"{archive}: archive not found")
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    _check_name(info.filename, root, archive)
                z.extractall(root)
            return
        with tarfile.open(archive) as t:
            _check_tar(t, root, archive)
            _check_tar_end(t, archive)
            t.extractall(root, filter="data")  # second line of defence, checks links at extraction time
    except DataError:
        raise
    except tarfile.FilterError as e:
        raise DataError(
            f"{archive}: member would escape the extraction folder or links outside it ({e})"
        ) from e
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        detail = " ".join(str(e).split())  # tarfile lists every method it tried, one per line
        raise DataError(f"{archive}: truncated or corrupt archive ({type(e).__name__}: {detail})") from e




def _check_tar_end(t: tarfile.TarFile, archive: Path) -> None:
    """tarfile stops silently at a bad header after the first member: whatever follows the last
    member read must be the end-of-archive zero blocks, and a compressed stream must end cleanly
    (reading it to the end checks the gzip/bz2/xz checksum)."""
    f = t.fileobj
    f.seek(t.offset)
    while chunk := f.read(1 << 20):
        if chunk.strip(b"\0"):
            raise DataError(
                f"{archive}: corrupt archive: a bad member header after {len(t.members)} members "
                "(re-download it)"
            )


def _stamp(archives: Sequence[Path]) -> list[list]:
    return [[a.name, a.stat().st_size, int(a.stat().st_mtime)] for a in archives]


def _extract_all(
    archives: Sequence[Path], dest: Path, check: Callable[[Path], object] | None = None
) -> Path:
    """Extract archives (merged) into dest atomically; skipped when dest was made from the same files.

    `check(folder)` verifies the new tree's layout before it replaces dest: a wrong or corrupt
    archive never costs the earlier good extraction.
    """
    dest = Path(dest)
    marker = dest / _MARKER
    with contextlib.suppress(OSError, ValueError):
        if json.loads(marker.read_text()) == _stamp(archives):
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    for left in dest.parent.glob(f".tmp-extract-{dest.name}-*"):  # of a killed earlier run
        shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-extract-{dest.name}-", dir=dest.parent))
    try:
        for a in archives:
            _extract_into(Path(a), tmp)
        if check is not None:
            try:
                check(tmp)
            except DataError as e:
                names = ", ".join(str(a) for a in archives)
                raise DataError(
                    f"{names}: not the expected archive ({str(e).replace(str(tmp), str(dest))}); "
                    f"{dest} was left as it was"
                ) from None
        (tmp / _MARKER).write_text(json.dumps(_stamp(archives)))
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract tar/tgz/zip into `dest` atomically; unsafe members or a corrupt archive raise DataError."""
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"{archive}: archive not found")
    return _extract_all([archive], Path(dest))


# ----------------------------------------------------------------------------- layouts


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: expected {what}")
    return path


def _check_counts(root: Path, counts: dict[str, int] | None, what: str) -> None:
    """Known sizes of a full release: `*.txt` keys count ids, folder keys count files below them."""
    for rel, n in (counts or {}).items():
        p = root / rel
        if p.suffix == ".txt":
            got = sum(1 for line in p.read_text().splitlines() if line.strip())
        else:
            got = sum(1 for q in p.rglob("*") if q.is_file())
        if got != n:
            raise DataError(
                f"{p}: {got} entries, but the official {what} has {n} (incomplete or not the release?)"
            )


def _verify_archive(path: Path, md5: str | None, what: str, key: str, sha256: str | None = None) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: archive not found ({key})")
    problem = _checksum_error(path, md5, sha256)
    if problem is not None:
        kind = "md5" if md5 else "sha256"
        raise DataError(f"{path}: {kind} is not {md5 or sha256} — not the official {what} ({problem})")
    return path


def _voc_root(path: Path) -> Path:
    for cand in (path / "VOCdevkit" / "VOC2012", path / "VOC2012", path):
        if (cand / "ImageSets").exists():
            return cand
    return path


def voc_layout(root: Path, counts: dict[str, int] | None = None) -> Path:
    for sub in (
        "JPEGImages",
        "SegmentationClass",
        "ImageSets/Segmentation/train.txt",
        "ImageSets/Segmentation/val.txt",
    ):
        _require(root / sub, f"{sub} of PASCAL VOC 2012 (VOCdevkit/VOC2012)")
    _check_counts(root, counts, "PASCAL VOC 2012")
    return root


def fetch_voc(
    dest: Path,
    url: str = VOC_URL,
    md5: str = VOC_MD5,
    archive: Path | None = None,
    extracted: Path | None = None,
    counts: dict[str, int] | None = None,
) -> Path:
    """The `VOCdevkit/VOC2012` folder: downloaded, or verified from an archive / a tree you already have.

    `counts=VOC_COUNTS` additionally insists on the full official release.
    """
    if extracted is not None:
        return voc_layout(_voc_root(Path(extracted)), counts)
    dest = Path(dest)
    if archive is not None:
        tar = _verify_archive(archive, md5, "VOCtrainval_11-May-2012.tar", "datasets.voc.source.archive")
    else:
        tar = download(url, dest / "VOCtrainval_11-May-2012.tar", md5=md5)
    def layout(d: Path) -> Path:
        return voc_layout(_require(d / "VOCdevkit" / "VOC2012", f"VOCdevkit/VOC2012 inside {tar.name}"), counts)

    return layout(_extract_all([tar], dest / "voc", layout))


def sbd_layout(root: Path, counts: dict[str, int] | None = None) -> Path:
    for sub in ("cls", "train.txt", "val.txt"):
        _require(root / sub, f"{sub} of SBD (benchmark_RELEASE/dataset)")
    _check_counts(root, counts, "SBD")
    return root


def fetch_sbd(
    dest: Path,
    url: str = SBD_URL,
    md5: str = SBD_MD5,
    archive: Path | None = None,
    extracted: Path | None = None,
    counts: dict[str, int] | None = None,
) -> Path:
    """SBD's `benchmark_RELEASE/dataset` folder (cls/*.mat, train.txt, val.txt)."""
    if extracted is not None:
        root = Path(extracted)
        for cand in (root / "benchmark_RELEASE" / "dataset", root / "dataset"):
            if cand.is_dir():
                root = cand
                break
        return sbd_layout(root, counts)
    dest = Path(dest)
    if archive is not None:
        tgz = _verify_archive(archive, md5, "SBD benchmark.tgz", "datasets.voc.source.sbd_archive")
    else:
        tgz = download(url, dest / "benchmark.tgz", md5=md5)
    def layout(d: Path) -> Path:
        return sbd_layout(
            _require(d / "benchmark_RELEASE" / "dataset", f"benchmark_RELEASE/dataset inside {tgz.name}"),
            counts,
        )

    return layout(_extract_all([tgz], dest / "sbd", layout))


# ----------------------------------------------------------------------------- Cityscapes


def _credentials_file() -> Path:
    """Where cityscapesscripts (appdirs user_data_dir) keeps credentials.json on Linux."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cityscapesscripts" / "credentials.json"


def cityscapes_credentials(username: str | None = None, password: str | None = None) -> tuple[str, str]:
    """Args, then CITYSCAPES_USERNAME/CITYSCAPES_PASSWORD, then cityscapesscripts' credentials.json."""
    username = username or os.environ.get("CITYSCAPES_USERNAME")
    password = password or os.environ.get("CITYSCAPES_PASSWORD")
    if username and password:
        return username, password
    cred = _credentials_file()
    if cred.is_file():
        try:
            data = json.loads(cred.read_text())
            return str(data["username"]), str(data["password"])
        except (ValueError, KeyError, TypeError, OSError):
            # never echo the file's content: it holds a password
            raise DataError(f"{cred}: expected JSON with 'username' and 'password'") from None
    raise DataError(
        "Cityscapes needs an account: set CITYSCAPES_USERNAME and CITYSCAPES_PASSWORD (or cityscapesscripts' "
        f"{cred}), or point datasets.cityscapes.source at the downloaded zips"
    )


def cityscapes_session(base_url: str, username: str, password: str) -> requests.Session:
    """Log in as csDownload does: GET then POST /login/; only an HTTP 302 answer means success."""
    s = requests.Session()
    try:
        s.get(f"{base_url}/login/", allow_redirects=False, timeout=TIMEOUT)
        r = s.post(
            f"{base_url}/login/",
            data={"username": username, "password": password, "submit": "Login"},
            allow_redirects=False,
            timeout=TIMEOUT,
        )
    except requests.RequestException as e:
        raise DataError(f"Cityscapes login at {base_url}/login/ failed: {type(e).__name__}") from None
    if r.status_code != 302:
        raise DataError(
            f"Cityscapes login failed at {base_url}/login/ (HTTP {r.status_code}, expected 302): check "
            "CITYSCAPES_USERNAME / CITYSCAPES_PASSWORD (or cityscapesscripts' credentials.json)"
        )
    return s


def _package_id(session: requests.Session, base_url: str, name: str) -> int:
    if name in CITYSCAPES_PACKAGES:
        return CITYSCAPES_PACKAGES[name][0]
    try:
        r = session.get(f"{base_url}/downloads/?list", allow_redirects=False, timeout=TIMEOUT)
        packages = {p["name"]: int(p["packageID"]) for p in r.json()}
    except (requests.RequestException, ValueError, KeyError, TypeError) as e:
        raise DataError(
            f"Cityscapes package {name!r}: cannot read the package list ({type(e).__name__})"
        ) from None
    if name not in packages:
        raise DataError(f"Cityscapes package {name!r}: not one of {sorted(packages)}")
    return packages[name]


def _remote_md5(session: requests.Session, base_url: str, package_id: int, name: str) -> str | None:
    try:
        r = session.get(f"{base_url}/md5-sum/?packageID={package_id}", allow_redirects=False, timeout=TIMEOUT)
    except requests.RequestException:
        return None
    token = r.text.split()[0].lower() if r.status_code == 200 and r.text.split() else ""
    return token if len(token) == 32 and all(c in "0123456789abcdef" for c in token) else None


def cityscapes_layout(root: Path, counts: dict[str, int] | None = None) -> Path:
    for sub in ("leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val"):
        _require(root / sub, f"{sub} of Cityscapes (leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip)")
    _check_counts(root, counts, "Cityscapes")
    return root


def fetch_cityscapes(
    dest: Path,
    packages: tuple[str, ...] = ("gtFine_trainvaltest.zip", "leftImg8bit_trainvaltest.zip"),
    base_url: str = CITYSCAPES_URL,
    username: str | None = None,
    password: str | None = None,
    archives: dict[str, Path] | None = None,
    extracted: Path | None = None,
    md5s: dict[str, str] | None = None,
    counts: dict[str, int] | None = None,
) -> Path:
    """A Cityscapes root with `leftImg8bit/` and `gtFine/`: downloaded through the login, or offline.

    Downloads are checked against the site's md5-sum endpoint (as csDownload does), falling back to
    the known release md5; offline zips against `md5s` or the known release md5.
    """
    if extracted is not None:
        return cityscapes_layout(Path(extracted), counts)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base_url = base_url.rstrip("/")
    known = {name: md5 for name, (_, md5) in CITYSCAPES_PACKAGES.items()} | (md5s or {})
    zips = []
    session = None
    for name in packages:
        if archives is not None:
            if name not in archives:
                raise DataError(
                    f"Cityscapes archive for {name} not given (datasets.cityscapes.source.archive)"
                )
            zips.append(
                _verify_archive(archives[name], known.get(name), name, "datasets.cityscapes.source.archive")
            )
            continue
        if session is None:
            session = cityscapes_session(base_url, *cityscapes_credentials(username, password))
        package_id = _package_id(session, base_url, name)
        md5 = (md5s or {}).get(name) or _remote_md5(session, base_url, package_id, name) or known.get(name)
        zips.append(
            download(
                f"{base_url}/file-handling/?packageID={package_id}",
                dest / name,
                md5=md5,
                session=session,
                allow_redirects=False,  # an expired session is redirected to the login page, never saved
            )
        )
    def layout(d: Path) -> Path:
        return cityscapes_layout(d, counts)

    return layout(_extract_all(zips, dest / "cityscapes", layout))
