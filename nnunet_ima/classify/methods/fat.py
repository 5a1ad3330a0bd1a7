"""FAT (Zhang et al. 2020, "Attacks which do not kill training make adversarial learning
stronger"): train on early-stopped PGD points, loss CE(f(x_adv), y).

Early-stopped PGD-K-tau: every sample takes PGD steps until it is misclassified, then at most tau
more steps; the point at which it stops (or the K-th iterate) is its training point. tau = 0 gives
the first misclassified iterate. Dynamic tau follows FAT's code (tau 0 up to epoch 50 of 120, 1 up
to 90, then 2), scaled to the run's length. The start is x + 0.001 N(0, I) as in FAT's code; K and
the step 4 eps / K follow the papers' shared 20-PGD setting.
"""
from __future__ import annotations

import torch

from nnunet_ima import get_norm
from nnunet_ima._model import attack_mode
from nnunet_ima.attacks import gradient, resolve_step_size, start_point, step
from nnunet_ima.losses import cross_entropy

from .base import Method, StepOutput, ce


def early_stopped_pgd(model, x, y, eps: float, *, tau: int, norm="l2", steps: int = 20, clip=None,
                      start_std: float = 0.001) -> torch.Tensor:
    """FAT's early-stopped PGD, built from the kernel's start/gradient/step primitives: the start is the
    kernel's ``delta_init`` start with delta_init = start_std * N(0, I) (FAT's code).

    Shape: x (B, ...), y (B,). Returns the training points (B, ...).
    """
    nrm = get_norm(norm)
    eps_t = torch.full((x.shape[0],), float(eps), device=x.device)
    alpha = resolve_step_size(None, eps_t, steps)
    x = x.detach()
    cur = start_point(x, eps_t, nrm, delta_init=start_std * torch.randn_like(x), clip=clip)
    out = cur.clone()
    act = torch.arange(x.shape[0], device=x.device)
    budget = torch.full_like(act, int(tau))
    x_a, y_a, e_a, a_a = x, y, eps_t, alpha
    with attack_mode(model, "eval"):
        for k in range(steps + 1):
            if k < steps:
                logits, g = gradient(model, cur.detach(), y_a, cross_entropy)
            else:
                with torch.no_grad():
                    logits = model(cur)
            wrong = logits.detach().argmax(1) != y_a
            stop = wrong & (budget == 0)
            out[act[stop]] = cur.detach()[stop]
            budget = budget - (wrong & ~stop).long()
            keep = ~stop
            act, x_a, y_a, e_a, a_a, budget = act[keep], x_a[keep], y_a[keep], e_a[keep], a_a[keep], budget[keep]
            cur = cur.detach()[keep]
            if k == steps or act.numel() == 0:
                break
            cur = step(x_a, cur, g[keep], e_a, a_a, nrm, clip)
        out[act] = cur.detach()
    return out


def dynamic_tau(epoch: int, epochs: int) -> int:
    """FAT's schedule for 120 epochs (0 until 50, 1 until 90, then 2) scaled to ``epochs``."""
    frac = (epoch + 1) / max(epochs, 1)
    return 0 if frac <= 50 / 120 else (1 if frac <= 90 / 120 else 2)


class Fat(Method):
    name = "fat"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.tau = cfg.fat_tau if cfg.fat_tau is not None else 0

    def start_epoch(self, epoch, epochs):
        self.tau = self.cfg.fat_tau if self.cfg.fat_tau is not None else dynamic_tau(epoch, epochs)

    def loss(self, model, x, y, ids):
        c = self.cfg
        x_adv = early_stopped_pgd(model, x, y, c.eps, tau=self.tau, norm=c.norm, steps=c.steps, clip=c.clip)
        logits_adv = model(x_adv)
        with torch.no_grad():
            logits = model(x)
        return StepOutput(ce(logits_adv, y).mean(), logits, x_adv, {"tau": self.tau})
