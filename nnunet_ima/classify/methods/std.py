"""STD: clean training, mean cross-entropy."""
from __future__ import annotations

from .base import Method, StepOutput, ce


class Std(Method):
    name = "std"

    def loss(self, model, x, y, ids):
        logits = model(x)
        return StepOutput(ce(logits, y).mean(), logits)
