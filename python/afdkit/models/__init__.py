"""Model definitions: configurations and weights (pure Python/torch, no native code)."""

from afdkit.models.step3 import Step3Config, Step3Weights, weight_shapes

__all__ = ["Step3Config", "Step3Weights", "weight_shapes"]
