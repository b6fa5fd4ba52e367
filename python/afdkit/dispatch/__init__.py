"""Expert-parallel dispatch/combine across ranks (see :mod:`afdkit.dispatch.types`)."""

from afdkit.dispatch.types import DispatchOutput

__all__ = ["DispatchOutput"]
