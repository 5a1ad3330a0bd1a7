"""MMA (Ding et al. 2020, "MMA training: direct input space margin maximization"), simplified.

Faithful parts: the margin of each correctly classified sample is estimated directly by AN-PGD
(PGD at the bound d_max, then a bisection between x and the PGD point for the smallest adversarial
scale); the loss is the MMA-d_max objective mixed with clean CE:
    L = w * mean_i CE(x_i)  +  (1 - w) * (1/B) * [ sum_{i correct, crossed within d_max} CE(x_i + delta_i*)
                                                    + sum_{j wrong} CE(x_j) ],   w = 1/3.
Correct samples whose margin exceeds d_max are left out of the margin term, as in MMA.
Simplifications, documented: AN-PGD is the kernel's BPGD ``variant="augment"`` with a fixed bound
d_max = eps (MMA adapts the PGD bound per sample from the previous margin and uses several
restarts); the loss at the margin point is CE (MMA's code offers CE or a soft logit margin).
"""
from __future__ import annotations

import torch

from nnunet_ima import bpgd

from .base import Method, StepOutput, ce


class Mma(Method):
    name = "mma"

    def loss(self, model, x, y, ids):
        c = self.cfg
        logits = model(x)
        l_clean = ce(logits, y)
        correct = logits.detach().argmax(1) == y
        term = torch.where(correct, torch.zeros_like(l_clean), l_clean)
        x_adv = x.detach().clone()
        idx = torch.nonzero(correct).flatten()
        margins = torch.full((x.shape[0],), float("nan"), device=x.device)
        if idx.numel():
            res = bpgd(model, x[idx], y[idx], c.eps, norm=c.norm, steps=c.steps, search_steps=c.search_steps,
                       variant="augment", clip=c.clip)
            hit = idx[res.crossed]
            if hit.numel():
                term = term.index_put((hit,), ce(model(res.x_adv[res.crossed]), y[hit]))
            x_adv[idx] = res.x_adv
            margins[hit] = res.distance[res.crossed]
        w = c.mma_clean_weight
        loss = w * l_clean.mean() + (1 - w) * term.sum() / x.shape[0]
        return StepOutput(loss, logits, x_adv, {"margins": margins})
