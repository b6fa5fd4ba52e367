"""The synchronisation model of the v5 MFA kernel (dev/mfa/v5_pipeline_model.py).

Random interleavings of the loader threads, the two consumers and the copies over
mbarrier-like objects: the design must never deadlock or let a reader see another
tile's data, and each deliberately broken variant must be caught (so the checker can fail).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "dev" / "mfa" / "v5_pipeline_model.py"


def _model():
    spec = importlib.util.spec_from_file_location("mfa_v5_pipeline_model", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_v5_pipeline_has_no_deadlock_or_stale_read() -> None:
    assert _model().main(["--runs", "1500", "--seed", "7"]) == 0


@pytest.mark.parametrize("mutation", ["no_k_empty_wait", "single_v_scale_slot", "issue_ahead_3",
                                      "no_v_empty_wait,v_after_qk"])
def test_model_catches_broken_variants(mutation: str) -> None:
    assert _model().main(["--runs", "400", "--seed", "7", "--mutate", mutation]) == 1
