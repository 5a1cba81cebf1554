"""Atomic writes: a reader (or a crash) never sees a half-written file or folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temp file in the same folder, then rename it over `path`.

    The temp name keeps the suffix, so writers that infer a format from it (savefig) still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; a result file is an ordinary file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: Path, text: str) -> Path:
    return atomic(path, lambda p: p.write_text(text, newline="\n"))


def write_json(path: Path, obj: object, sort_keys: bool = True) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


def replace_dir(tmp: Path, dest: Path) -> None:
    """Swap a finished `tmp` folder in; the old `dest` is deleted only once the new one is in place."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{dest.name}-", dir=dest.parent))
        os.replace(dest, old / "x")
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old / "x", dest)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
