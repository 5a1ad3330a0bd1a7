"""SAT (standard adversarial training, later paper eq. 4-5): 20-step PGD at a fixed eps with a
random start and step 4 eps / 20, loss (CE(x) + CE(x_adv)) / 2."""
from __future__ import annotations

from nnunet_ima import pgd

from .base import Method, StepOutput, ce


class Sat(Method):
    name = "sat"

    def loss(self, model, x, y, ids):
        c = self.cfg
        x_adv = pgd(model, x, y, c.eps, norm=c.norm, steps=c.steps, random_start=True, clip=c.clip)
        logits = model(x)
        loss = (ce(logits, y).mean() + ce(model(x_adv), y).mean()) / 2
        return StepOutput(loss, logits, x_adv)
