"""IMA, later paper Algorithm 1 in mini-batches (Algorithm 2 BPGD; Algorithm 3 when data
augmentation is on), with the earlier paper's beta loss and margin rules as options (``ima_rule="earlier"``: re-initialise
to Delta on a clean error, shrink to ||x - x~|| exactly when BPGD found the boundary, clip at Delta).

Per batch: one clean forward (its graph is kept for the loss, not recomputed); BPGD only for the
correctly classified samples, inside their margins E(i); one forward of their noisy samples; loss
(L0 + L1) / 2 with L1 <- L0 for the wrong ones; margin update with g(z~) read off that same noisy
forward. Sample ids are dataset indices. In multi-process runs every rank updates the margins of
its own samples and :meth:`end_epoch` merges them (each sample is seen once per epoch, so merging
once per epoch gives the single-process result).
"""
from __future__ import annotations

import torch

from nnunet_ima import MarginStore, bpgd, ima_beta_loss, ima_loss

from .base import Method, MethodConfig, StepOutput, ce

RULES = {"later": {}, "earlier": {"on_clean_wrong": "reinit", "shrink": "replace", "clip_min": "delta"}}


class Ima(Method):
    name = "ima"
    uses_margins = True

    def __init__(self, cfg: MethodConfig):
        super().__init__(cfg)  # MethodConfig has validated ima_rule, ima_loss, delta > 0
        self.store = MarginStore(cfg.delta, cfg.eps, **RULES[cfg.ima_rule])

    def loss(self, model, x, y, ids):
        c = self.cfg
        logits = model(x)
        l0 = ce(logits, y)
        correct = logits.detach().argmax(1) == y
        eps = self.store.get(ids, device=x.device)
        x_adv = x.detach().clone()
        noisy_correct = torch.zeros_like(correct)
        distance = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        valid = torch.ones_like(correct)
        l1 = l0
        idx = torch.nonzero(correct).flatten()
        if idx.numel():
            res = bpgd(model, x[idx], y[idx], eps[idx], norm=c.norm, steps=c.steps, search_steps=c.search_steps,
                       variant="augment" if c.augment else "boundary", clip=c.clip)
            noisy_logits = model(res.x_adv)
            l1 = l0.index_put((idx,), ce(noisy_logits, y[idx]))
            x_adv[idx] = res.x_adv
            if c.ima_rule == "later":  # Algorithm 1, line 13: g(z~) = y, read off the noisy forward
                noisy_correct[idx] = noisy_logits.detach().argmax(1) == y[idx]
            else:  # earlier paper's Algorithm 2: shrink exactly when BPGD found the boundary
                noisy_correct[idx] = ~res.crossed
            distance[idx] = res.distance
            valid[idx] = res.valid
        if c.ima_loss == "mean":
            loss = ima_loss(l0, l1, correct)
        else:
            loss = ima_beta_loss(l0, l1, correct, c.ima_beta)
        self.store.update(ids, correct, noisy_correct, distance, valid)
        return StepOutput(loss, logits, x_adv, {"attacked": int(idx.numel())})

    def start_epoch(self, epoch, epochs):
        self.store.reset_counters()

    def end_epoch(self):
        self.store.merge()

    def state_dict(self):
        return {"margins": self.store.state_dict()}

    def load_state_dict(self, state):
        self.store.load_state_dict(state["margins"])

    def summary(self):
        return self.store.format_summary()
