"""STD: clean training, mean cross-entropy."""
from __future__ import annotations

from .base import Method, StepOutput, ce


class Std(Method):
    name = "std"
    settings = ()  # clean training reads no method setting

    def loss(self, model, x, y, ids):
        logits = model(x)
        return StepOutput(ce(logits, y).mean(), logits)
