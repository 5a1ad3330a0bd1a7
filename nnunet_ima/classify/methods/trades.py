"""TRADES (Zhang et al. 2019): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv from PGD that
maximises the KL term (K = 20 steps, step 4 eps / K as the papers' 20-PGD; beta = 6).

The inner attack starts at x + 0.001 N(0, I) as in TRADES' code (the kernel PGD's ``delta_init``; the
KL gradient vanishes at x itself, so some random start is needed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nnunet_ima import pgd

from .base import Method, StepOutput, ce


def kl_per_sample(output, p_clean):
    """KL(p_clean || softmax(output)) per sample (B,): the attack loss of TRADES."""
    return F.kl_div(F.log_softmax(output, 1), p_clean, reduction="none").sum(1)


class Trades(Method):
    name = "trades"
    start_std = 0.001  # TRADES' start x + 0.001 N(0, I); None: uniform in the eps-ball (the kernel's random start)

    def loss(self, model, x, y, ids):
        c = self.cfg
        logits = model(x)
        p_clean = F.softmax(logits.detach(), 1)
        x_adv = pgd(model, x, p_clean, c.eps, norm=c.norm, steps=c.steps, loss=kl_per_sample, clip=c.clip,
                    delta_init=None if self.start_std is None else self.start_std * torch.randn_like(x))
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
        loss = ce(logits, y).mean() + c.trades_beta * kl
        return StepOutput(loss, logits, x_adv, {"kl": float(kl.detach())})
