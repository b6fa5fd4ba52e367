"""Loads a script under dev/ (CPU models of the kernels) as a module for its tests."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_dev_module(relpath: str, name: str) -> ModuleType:
    """The file at `relpath` (from the repository root) imported as module `name`."""
    spec = importlib.util.spec_from_file_location(name, _ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod
