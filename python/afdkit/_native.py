"""Loads the compiled core once, after the UCX libraries it links against."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.lru_cache(maxsize=None)
def native() -> ModuleType:
    """Returns ``afdkit._C``; raises ImportError with a build hint when it is missing."""
    try:  # the libucx wheel's libraries must be loaded before _C resolves libucp
        import libucx

        libucx.load_library()
    except ImportError:
        pass  # a system UCX found through the loader's search path
    try:
        return importlib.import_module("afdkit._C")
    except ImportError as exc:
        raise ImportError(
            "afdkit's native core (afdkit._C) is not available: install the package with "
            "`pip install --no-build-isolation .` from a checkout (see README.md). "
            f"Cause: {exc}"
        ) from exc
