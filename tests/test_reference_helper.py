"""The reference importer leaves no trace: `sys.path` and `sys.modules` are as before."""

from __future__ import annotations

import sys

import pytest

from tests import reference
from tests.reference import reference_modules


def test_reference_modules_restore_sys_state():
    path, modules = list(sys.path), dict(sys.modules)
    with reference_modules("util.ohem", "dataset.transform") as (ohem, transform):
        assert hasattr(ohem, "ProbOhemCrossEntropy2d") and hasattr(transform, "obtain_cutmix_box")
        assert "util" in sys.modules and "dataset.transform" in sys.modules
    assert sys.path == path
    assert "util" not in sys.modules and "dataset" not in sys.modules
    assert {k: v for k, v in sys.modules.items() if k in modules} == {
        k: v for k, v in modules.items() if k in sys.modules
    }


def test_reference_modules_skip_without_the_folder(monkeypatch, tmp_path):
    monkeypatch.setattr(reference, "REF", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception), reference_modules("util.ohem"):
        pass
