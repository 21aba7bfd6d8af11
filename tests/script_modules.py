"""Scripts and benchmarks (files, not package modules) loaded as modules by the tests that run them (not a test module)."""
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """`ROOT/relative` as a module named after its file, in sys.modules for the test's duration (dataclasses and
    pickling look their module up there)."""
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module
