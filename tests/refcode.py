"""Import the reference UniMatch code (../shared/reference/unimatch) as a test oracle.

Its modules import each other as top-level packages (`model`, `util`, `dataset`), names that are
too generic to leave behind: `reference()` puts the folder on sys.path, imports what a test asks
for, and removes both the path and those modules again when the test ends. A test using it is
skipped where ../shared is absent (a clone without the shared folder).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.conftest import SHARED

UNIMATCH = SHARED / "reference" / "unimatch"
_TOP = ("model", "util", "dataset", "supervised", "unimatch")


@contextlib.contextmanager
def reference(*names: str) -> Iterator[list[ModuleType]]:
    """Yield the reference modules `names` (e.g. 'model.semseg.deeplabv3plus'); skip if absent."""
    if not UNIMATCH.is_dir():
        pytest.skip(f"{UNIMATCH} not present (the reference oracle lives in ../shared)")
    before = set(sys.modules)
    sys.path.insert(0, str(UNIMATCH))
    try:
        yield [importlib.import_module(n) for n in names]
    finally:
        sys.path.remove(str(UNIMATCH))
        for mod in set(sys.modules) - before:
            if mod.split(".")[0] in _TOP:
                del sys.modules[mod]
