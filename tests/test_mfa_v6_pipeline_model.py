"""The synchronisation model of the v6 MFA kernel (dev/mfa/v6_pipeline_model.py).

Random interleavings of the loader threads, the two consumers and the copies over
mbarrier-like objects: the design must never deadlock or let a reader see another
tile's data (K / V stages, scale slots, V operand tiles, Q, row_ml), for the fp8 and
bf16 rings with per-tensor and per-token scales, and each deliberately broken variant
must be caught (so the checker can fail).
"""

from __future__ import annotations

import pytest

from dev_module import load_dev_module


def _model():
    return load_dev_module("dev/mfa/v6_pipeline_model.py", "mfa_v6_pipeline_model")


@pytest.mark.parametrize("config", ["fp8-tensor", "fp8-token", "bf16-tensor", "bf16-token"])
def test_v6_pipeline_has_no_deadlock_or_stale_read(config: str) -> None:
    assert _model().main(["--runs", "400", "--seed", "7", "--config", config]) == 0


@pytest.mark.parametrize("mutation,config", [
    ("few_v_scale_slots", "fp8-token"),
    ("few_v_scale_slots", "bf16-token"),
    ("no_k_empty_wait", "fp8-tensor"),
    ("no_k_empty_wait", "fp8-token"),
    ("no_k_empty_wait", "bf16-tensor"),
    ("early_k_release", "fp8-token"),
    ("early_k_release", "bf16-token"),
])
def test_model_catches_broken_variants(mutation: str, config: str) -> None:
    assert _model().main(["--runs", "300", "--seed", "7", "--config", config, "--mutate", mutation]) == 1

