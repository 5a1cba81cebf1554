"""Atomic writes: a reader (or a crash) never sees a half-written file or folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_text(path: Path, text: str) -> Path:
    """Write via a temp file in the same folder, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj: object) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


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
