"""The published split lists (LiheYoung/UniMatch at a pinned commit): fetched, md5-verified, cached.

Why: the paper's classic VOC (92 ... 1464) and Cityscapes (1/16 ... 1/30) splits are fixed lists
whose generation seeds were never published, and a different draw at 92 or 183 labels moves mIoU by
1-3 points. So the pipeline reads the very files the paper used: the raw files of UniMatch's
`splits/<pascal|cityscapes>/` at `COMMIT` (DSSN ships the same blobs), a mirror of that folder
(`url`), or a local copy of it (`root`, no network). Every file must match the md5 pinned below,
whatever its origin; a list the pin does not know is an error, never an unchecked download.
Downloads go through `fetch.download` (resumable, verified before they are renamed into place) into
a cache, so a second run makes no request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.errors import DataError

REPO = "LiheYoung/UniMatch"
COMMIT = "0324f3dd4a22128105a5eb135d2586c0bb3cc647"
URL = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/splits"
# dataset kind -> UniMatch's folder under splits/
DATASET_DIRS = {"voc": "pascal", "cityscapes": "cityscapes"}
# md5 of every list at COMMIT (recorded with the files' provenance in ../shared/splits/SOURCES.md).
MD5 = {
    "pascal/92/labeled.txt": "8f1558065220c2cdd109a4774b59522c",
    "pascal/92/unlabeled.txt": "614814e3499218f27a7f490c87dfe45a",
    "pascal/183/labeled.txt": "140482eb82cd5ccc2aa933badfa09d3f",
    "pascal/183/unlabeled.txt": "b12a617dcf112e3f323072b6b46a0ae0",
    "pascal/366/labeled.txt": "9a318af2831e87d3028c9edcbed6a245",
    "pascal/366/unlabeled.txt": "d90c523c51e8255e21e70fcbe997be5a",
    "pascal/732/labeled.txt": "aa6fe23c91a13acc6951d032aa79cc96",
    "pascal/732/unlabeled.txt": "1286f36f6117e3d31f4322edb3ad8b46",
    "pascal/1464/labeled.txt": "8a5f144a65a267ffcabe49b5265c0959",
    "pascal/1464/unlabeled.txt": "bc4c6fb36cd79fbf9ffa3f5e80748246",
    "pascal/1_16/labeled.txt": "5ec174d045f26e40466c57c90a0d6feb",
    "pascal/1_16/unlabeled.txt": "9847c9c55d84896f9f262c8bce97749f",
    "pascal/1_8/labeled.txt": "cb6e9a3f4cfc95a41316721b1235d26f",
    "pascal/1_8/unlabeled.txt": "aec3a69395dfe37adb29b83f4cab6f3a",
    "pascal/1_4/labeled.txt": "75d3bf980f1eecfb24a9701f5a19155b",
    "pascal/1_4/unlabeled.txt": "dd1b6ad1c3839b7793a2f8599b415f47",
    "pascal/val.txt": "a5fbb60af7b588bbaaa180354a58caa3",
    "cityscapes/1_16/labeled.txt": "6dd86fb5754f1a19f65ad970bd731296",
    "cityscapes/1_16/unlabeled.txt": "60dce41b324cef8a2745b9695c876af0",
    "cityscapes/1_8/labeled.txt": "35c24de4635fcf6cd9708f9c783d0577",
    "cityscapes/1_8/unlabeled.txt": "8f461138c6cdf2987205ea617656352d",
    "cityscapes/1_4/labeled.txt": "12374ac0c3467dfc1d1d6ec29d372dc1",
    "cityscapes/1_4/unlabeled.txt": "c129dd9438eb91a1d4fc1b68c8901569",
    "cityscapes/1_2/labeled.txt": "c3ca6e015ac688e94823466d03e82081",
    "cityscapes/1_2/unlabeled.txt": "786dcfba8e455e87a93fe205f7ef0129",
    "cityscapes/1_30/labeled.txt": "81429afbf35649b69f3162d8ef849481",
    "cityscapes/1_30/unlabeled.txt": "b60945e3a3e0c8e74c660c89d389bf4b",
    "cityscapes/val.txt": "6dad9cfa0af724bdcdc3d80532ff81dc",
}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class PublishedSource:
    """The published lists of one dataset. `root` (a local copy of UniMatch's `splits/`) wins over `url`
    (the pinned raw files, or a mirror of that folder); downloads are kept under `cache`."""

    dataset: str  # UniMatch's folder: "pascal" or "cityscapes"
    url: str = URL
    root: Path | None = None
    cache: Path | None = None
    md5s: Mapping[str, str] = field(default_factory=lambda: dict(MD5))

    @classmethod
    def for_kind(
        cls, kind: str, url: str | None = None, root: Path | None = None, cache: Path | None = None
    ) -> PublishedSource:
        """The source for a dataset of `kind` (params: `published_url` / `published_root`)."""
        if kind not in DATASET_DIRS:
            raise DataError(
                f"splits.source 'published': {REPO} publishes lists for {sorted(DATASET_DIRS)} datasets only, "
                f"not for kind {kind!r}"
            )
        return cls(DATASET_DIRS[kind], url or URL, None if root is None else Path(root), cache)

    @property
    def pinned(self) -> str:
        return f"{REPO}@{COMMIT}"

    def known_splits(self) -> list[str]:
        """The splits pinned for this dataset, in table order."""
        parts = (k.split("/") for k in self.md5s)
        return list(dict.fromkeys(p[1] for p in parts if len(p) == 3 and p[0] == self.dataset))

    def check_known(self, splits: Iterable[str]) -> None:
        """Fail before any download on a split the pin does not cover (never fetch unchecked lists)."""
        known = self.known_splits()
        for split in splits:
            for name in ("labeled.txt", "unlabeled.txt"):
                if f"{self.dataset}/{split}/{name}" not in self.md5s:
                    raise DataError(
                        f"{self.dataset}/{split}/{name}: not a pinned list of {self.pinned} "
                        f"(pinned {self.dataset} splits: {', '.join(known)}); build split {split!r} with "
                        "source: generate"
                    )

    def origin(self, rel: str) -> str:
        """Where `rel` (e.g. `92/labeled.txt`) is read from: a local path or a URL."""
        if self.root is not None:
            return str(self.root / self.dataset / rel)
        return f"{self.url.rstrip('/')}/{self.dataset}/{rel}"

    def get(self, rel: str) -> tuple[Path, str]:
        """A local, md5-verified copy of `<dataset>/<rel>` and its md5."""
        key = f"{self.dataset}/{rel}"
        md5 = self.md5s.get(key)
        if md5 is None:
            raise DataError(f"{key}: not a pinned list of {self.pinned}")
        if self.root is not None:
            path = self.root / self.dataset / rel
            if not path.is_file():
                raise DataError(f"{path}: published split list file not found (splits.published_root)")
            got = _md5(path)
            if got != md5:
                raise DataError(
                    f"{path}: checksum mismatch (expected md5 {md5}, got {got}): not the published {key} "
                    f"of {self.pinned}"
                )
            return path, md5
        if self.cache is None:
            raise DataError(f"{key}: downloading the published lists needs a cache folder")
        from pipeline.data.fetch import download  # requests/torchvision: only when downloading

        dest = self.cache / self.dataset / rel
        url = self.origin(rel)
        try:
            download(url, dest, md5=md5)  # an already verified copy is kept without a request
        except DataError as e:
            raise DataError(f"published split list {key}: {str(e).removeprefix(dest.name + ': ')}") from e
        return dest, md5

    def describe(self, split: str) -> dict:
        """What split.json records: the pin, where the files came from and their md5s."""
        return {
            "pinned": self.pinned,
            "from": self.origin(split),
            "md5": {
                **{n: self.md5s[f"{self.dataset}/{split}/{n}"] for n in ("labeled.txt", "unlabeled.txt")},
                "val.txt": self.md5s.get(f"{self.dataset}/val.txt"),
            },
        }
