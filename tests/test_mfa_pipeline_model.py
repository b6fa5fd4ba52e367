"""The synchronisation model of the v5 MFA kernel (dev/mfa/v5_pipeline_model.py).

Random interleavings of the loader threads, the two consumers and the copies over
mbarrier-like objects: the design must never deadlock or let a reader see another
tile's data, and each deliberately broken variant must be caught (so the checker can fail).
"""

from __future__ import annotations

import pytest

from dev_module import load_dev_module


def _model():
    return load_dev_module("dev/mfa/v5_pipeline_model.py", "mfa_v5_pipeline_model")


def test_v5_pipeline_has_no_deadlock_or_stale_read() -> None:
    assert _model().main(["--runs", "1500", "--seed", "7"]) == 0


@pytest.mark.parametrize("mutation", ["no_k_empty_wait", "single_v_scale_slot", "issue_ahead_3",
                                      "no_v_empty_wait,v_after_qk"])
def test_model_catches_broken_variants(mutation: str) -> None:
    assert _model().main(["--runs", "400", "--seed", "7", "--mutate", mutation]) == 1
