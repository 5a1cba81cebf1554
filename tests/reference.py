"""Import the UniMatch reference code (../shared/reference/unimatch) as a test oracle, without leaks.

The reference modules import each other as top-level packages (`util.ohem`, `dataset.transform`,
`model.semseg...`), so its folder has to be on `sys.path` while they load. `reference_modules`
puts it there, imports what a test asks for and afterwards restores `sys.path` and every
`sys.modules` entry under the reference's top-level names, so `util`, `dataset`, `model`, ... never
shadow anything in other tests. Never copy the reference into the repository (SOURCES.md there).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.conftest import SHARED

REF = SHARED / "reference" / "unimatch"


def _top_names() -> set[str]:
    return {p.stem for p in REF.iterdir() if p.suffix == ".py" or (p.is_dir() and not p.name.startswith("."))}


def _stubs() -> dict[str, types.ModuleType]:
    """Modules supervised.py/unimatch.py import that the oracle does not need: the DDP launcher helper
    (not in the stored copy) and, when tensorboard is not installed, its SummaryWriter."""
    stubs = {}
    if not (REF / "util" / "dist_helper.py").exists():
        dist_helper = types.ModuleType("util.dist_helper")
        dist_helper.setup_distributed = lambda *a, **k: (0, 1)  # type: ignore[attr-defined]
        stubs["util.dist_helper"] = dist_helper
    try:
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        tb = types.ModuleType("torch.utils.tensorboard")
        tb.SummaryWriter = object  # type: ignore[attr-defined]
        stubs["torch.utils.tensorboard"] = tb
    return stubs


@contextmanager
def reference_modules(*names: str) -> Iterator[list[types.ModuleType]]:
    """The reference modules `names` (e.g. "util.ohem", "supervised"); skips when the folder is absent."""
    if not REF.is_dir():
        pytest.skip(f"reference code not available at {REF}")
    tops = _top_names()
    owned = lambda k: k.split(".")[0] in tops  # noqa: E731
    saved_path = list(sys.path)
    stubs = _stubs()
    saved = {k: v for k, v in sys.modules.items() if owned(k) or k in stubs}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(REF))
    sys.modules.update(stubs)
    try:
        yield [importlib.import_module(n) for n in names]
    finally:
        for k in [k for k in sys.modules if owned(k) or k in stubs]:
            del sys.modules[k]
        sys.modules.update(saved)
        sys.path[:] = saved_path
