"""rand eps (earlier paper, COVID-19 section): training with random noise drawn uniformly from the
eps-ball (in Linf: uniform white noise of amplitude eps per pixel), the random analogue of SAT:
loss (CE(x) + CE(x + noise)) / 2."""
from __future__ import annotations

from nnunet_ima import get_norm

from .base import Method, StepOutput, ce


class RandNoise(Method):
    name = "rand"

    def loss(self, model, x, y, ids):
        c = self.cfg
        x_n = x + get_norm(c.norm).random(x, x.new_full((x.shape[0],), c.eps))
        if c.clip is not None:
            x_n = x_n.clamp(*c.clip)
        logits = model(x)
        loss = (ce(logits, y).mean() + ce(model(x_n), y).mean()) / 2
        return StepOutput(loss, logits, x_n)
