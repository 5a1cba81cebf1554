"""Atomic writes leave files readable as any other file the user creates (umask), not 0600."""

from __future__ import annotations

import os
import stat

from pipeline.io import atomic, write_json


def test_atomic_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_json(tmp_path / "a.json", {"x": 1})
        q = atomic(tmp_path / "b.txt", lambda t: t.write_text("y"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert stat.S_IMODE(q.stat().st_mode) == 0o644
    assert not list(tmp_path.glob(".*tmp*"))
