"""Ray Tune's storage (`paths.ray_results`): a local folder, an NFS path or a pyarrow URI.

Trials on a cluster share no filesystem with the driver, so everything a trial leaves behind
(its resume checkpoints through Tune, its best/last weights, the driver's bookkeeping) goes
through the pyarrow filesystem Ray itself uses for `RunConfig(storage_path=...)`: `s3://bucket/x`
(credentials and `AWS_ENDPOINT_URL` from the environment, as for any AWS client), `gs://...`, or a
plain path. A location is a string, so it travels to the trials as one.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def is_uri(location: str) -> bool:
    return "://" in str(location)


@dataclass(frozen=True)
class Store:
    """One place in the storage: `fs` (pyarrow) and `path` (inside fs), printable as `uri`."""

    fs: Any
    path: str
    scheme: str  # "" for a local path

    @staticmethod
    def at(location: str | os.PathLike, root: Path | None = None) -> Store:
        """A local path (relative to `root`) or a URI that pyarrow understands."""
        import pyarrow.fs as pafs

        location = str(location)
        if is_uri(location):
            fs, path = pafs.FileSystem.from_uri(location)
            scheme = location.split("://", 1)[0]
            return Store(fs, path.rstrip("/"), "" if scheme == "file" else scheme)
        path = Path(location)
        if not path.is_absolute():
            path = (root or Path.cwd()) / path
        return Store(pafs.LocalFileSystem(), str(path.resolve()), "")

    @property
    def local(self) -> bool:
        return not self.scheme

    @property
    def uri(self) -> str:
        """The location as a user types it (a local path, or scheme://bucket/key); query-free."""
        return self.path if self.local else f"{self.scheme}://{self.path}"

    def __truediv__(self, name: str) -> Store:
        return Store(self.fs, posixpath.join(self.path, str(name)), self.scheme)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def children(self) -> list[Store]:
        """The entries directly under this folder (none when it does not exist)."""
        import pyarrow.fs as pafs

        if not self.exists():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted((Store(self.fs, i.path, self.scheme) for i in infos), key=lambda s: s.path)

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def read_text(self) -> str | None:
        """The file's text, or None when there is none."""
        if not self.exists():
            return None
        with self.fs.open_input_stream(self.path) as f:
            return f.read().decode()

    def write_bytes(self, data: bytes) -> None:
        """Atomic on a local disk (temp file + rename); an object store's PUT is atomic itself."""
        if self.local:
            from pipeline.io import atomic

            atomic(Path(self.path), lambda p: p.write_bytes(data))
            return
        self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def upload(self, src: Path) -> None:
        """Copy a local file here (atomically on a local disk)."""
        if self.local:
            from pipeline.io import atomic

            atomic(Path(self.path), lambda p: shutil.copyfile(src, p))
            return
        import pyarrow.fs as pafs

        self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        pafs.copy_files(
            str(src), self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
        )

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def rmtree(self) -> None:
        if self.exists():
            self.fs.delete_dir(self.path)
