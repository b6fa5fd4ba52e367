"""Shared fixtures: GPU tests are marked `gpu` and skipped where no CUDA device is."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh, seeded CPU generator per test: random, never zeros, reproducible."""
    g = torch.Generator()
    g.manual_seed(20260722)
    return g


@pytest.fixture
def native():
    from afdkit._native import native as load

    return load()
