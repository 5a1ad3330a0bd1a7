"""APGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Algorithm 1) for any per-sample loss, L2 and Linf, per-sample eps.

Step-size free: every sample starts with eta = 2 eps and halves it at checkpoints w_j = ceil(p_j N),
p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), when
  condition 1: fewer than rho = 0.75 of the steps since the last checkpoint increased the loss, or
  condition 2: eta was not halved at the last checkpoint and the best loss has not grown since;
after a halving the sample restarts from its best point. The update has momentum alpha = 0.75:
  z = P(x_k + eta h(g_k)),  x_{k+1} = P(x_k + alpha (z - x_k) + (1 - alpha)(x_k - x_{k-1}))
(the first step has no momentum). h(g) is the norm's steepest-ascent direction (unit L2 gradient, or
sign). The best (highest-loss) point of each sample is returned.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._model import attack_mode
from .attacks import _clip, check_clip, check_delta_init, start_point
from .losses import evaluate_loss, get_loss
from .norms import Norm, _per_sample, get_norm
from .validation import check_inputs, on_finite_rows

RHO = 0.75       # condition 1: fraction of successful steps below which eta halves
MOMENTUM = 0.75  # alpha of the momentum update


def checkpoints(steps: int) -> list[int]:
    """The paper's checkpoints w_j = ceil(p_j * steps), j >= 1, that lie within ``steps``."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    ws = {math.ceil(round(pj * steps, 9)) for pj in p[1:]}  # round: 0.57 * 100 is 57.000000001 in floats
    return sorted(w for w in ws if 0 < w <= steps)


@dataclass
class APGDState:
    """What a ``callback(state)`` sees after each iterate k (k = 0 is the start point).

    loss (B,): loss at x_k; best_loss (B,): highest loss so far; step_size (B,): eta for the next
    step; halved (B,) bool: eta was halved (and the sample restarted from its best point) at k."""
    k: int
    x_adv: torch.Tensor
    loss: torch.Tensor
    best_loss: torch.Tensor
    step_size: torch.Tensor
    halved: torch.Tensor


class _Run:
    """The per-sample state of one APGD run (x_k, x_{k-1}, gradient, best point, eta, checkpoints)."""

    def __init__(self, x, x0, loss0, g0, eps, norm: Norm, clip):
        self.x, self.eps, self.norm, self.clip = x, eps, norm, clip
        self.cur, self.prev, self.g = x0, x0, g0
        self.loss = loss0
        self.best_x, self.best_loss = x0.clone(), loss0.clone()
        self.best_g = None if g0 is None else g0.clone()  # None when steps = 0
        self.eta = 2.0 * eps
        self.ups = torch.zeros_like(loss0)               # loss increases since the last checkpoint
        self.best_at_check = loss0.clone()               # f_max at the last checkpoint
        self.halved_at_check = torch.zeros_like(loss0, dtype=torch.bool)
        self.last_check = 0

    def project(self, z):
        return _clip(self.x + self.norm.project(z - self.x, self.eps), self.clip)

    def propose(self, first: bool) -> torch.Tensor:
        """x_{k+1} from x_k, x_{k-1} and g_k (momentum, then projection)."""
        with torch.no_grad():
            z = self.project(self.cur + _per_sample(self.eta, self.x) * self.norm.direction(self.g))
            if first:
                return z
            a = MOMENTUM
            return self.project(self.cur + a * (z - self.cur) + (1 - a) * (self.cur - self.prev))

    def accept(self, x_new, loss_new, g_new):
        """Move to x_{k+1}: count a loss increase, keep the best point per sample."""
        self.ups += (loss_new > self.loss).to(self.ups.dtype)
        self.prev, self.cur, self.loss = self.cur, x_new, loss_new
        if g_new is not None:
            self.g = g_new
        better = loss_new > self.best_loss
        self.best_loss = torch.where(better, loss_new, self.best_loss)
        self.best_x[better] = x_new[better]
        if g_new is not None:
            self.best_g[better] = g_new[better]

    def checkpoint(self, k: int) -> torch.Tensor:
        """At w_j: halve eta where condition 1 or 2 holds and restart those samples from their best
        point. Returns the (B,) mask of samples that halved."""
        cond1 = self.ups < RHO * (k - self.last_check)
        cond2 = ~self.halved_at_check & (self.best_loss <= self.best_at_check)
        halve = cond1 | cond2
        self.eta = torch.where(halve, self.eta / 2, self.eta)
        self.cur = torch.where(_per_sample(halve, self.cur).bool(), self.best_x, self.cur)
        self.g = torch.where(_per_sample(halve, self.g).bool(), self.best_g, self.g)
        self.loss = torch.where(halve, self.best_loss, self.loss)  # the next step is compared with f(x_max)
        self.halved_at_check, self.best_at_check = halve, self.best_loss.clone()
        self.ups.zero_()
        self.last_check = k
        return halve


def _loss_and_grad(model, x_adv, y, loss_fn, progress: float, need_grad: bool):
    """Per-sample loss (B,) at x_adv and, if ``need_grad``, its input gradient."""
    if need_grad:
        x_adv = x_adv.detach().requires_grad_(True)
        out = model(x_adv)
        loss = evaluate_loss(loss_fn, out, y, progress)
        _check_per_sample(loss, x_adv.shape[0])
        (g,) = torch.autograd.grad(loss.sum(), x_adv)
        return loss.detach(), g
    with torch.no_grad():
        loss = evaluate_loss(loss_fn, model(x_adv), y, progress)
    _check_per_sample(loss, x_adv.shape[0])
    return loss.detach(), None


def _check_per_sample(loss: torch.Tensor, b: int):
    if loss.shape != (b,):
        raise ValueError(f"loss: APGD needs per-sample losses of shape ({b},) to keep each sample's best "
                         f"point, got shape {tuple(loss.shape)}")


def _apgd_once(model, x, y, eps, norm, steps, loss_fn, clip, x0, callback):
    """One APGD run from x0. Returns (best point (B, ...), best loss (B,))."""
    loss0, g0 = _loss_and_grad(model, x0, y, loss_fn, 0.0, steps > 0)
    run = _Run(x, x0.detach(), loss0, g0, eps, norm, clip)
    no = torch.zeros_like(loss0, dtype=torch.bool)
    if callback is not None:
        callback(APGDState(0, run.cur, run.loss, run.best_loss, run.eta, no))
    checks = set(checkpoints(steps))
    for k in range(1, steps + 1):
        x_new = run.propose(first=(k == 1))
        loss_new, g_new = _loss_and_grad(model, x_new, y, loss_fn, min(k, steps - 1) / steps, k < steps)
        run.accept(x_new, loss_new, g_new)
        halved = run.checkpoint(k) if (k in checks and k < steps) else no
        if callback is not None:
            callback(APGDState(k, run.cur, run.loss, run.best_loss, run.eta, halved))
    return run.best_x, run.best_loss


def apgd(model, x, y, eps, *, norm="l2", steps: int = 100, loss="ce", clip=None, model_mode: str = "eval",
         generator: torch.Generator | None = None, random_start: bool = True, delta_init=None, restarts: int = 1,
         callback=None) -> torch.Tensor:
    """APGD (Croce & Hein 2020) maximising a per-sample ``loss``; returns each sample's best point.

    Shape: x (B, C, *S) (2d or 3d), y what the loss takes (labels (B, *S) / (B, 1, *S)); eps a float
    or a (B,) tensor. ``loss``: a name of :func:`nnunet_ima.losses.get_loss` ("ce", "masked_ce",
    "balanced_masked_ce", "js", ...) or a callable returning (B,). Start: ``delta_init`` if given,
    else uniform in the ball (``random_start``, AutoAttack's default) or x. ``restarts`` > 1 runs again
    from new random starts and keeps, per sample, the highest loss. ``callback(state)`` sees an
    :class:`APGDState` after every iterate (k = 0..steps of each restart).

    >>> x_adv = apgd(model, x, y, eps=1.0, norm="l2", steps=100, loss="masked_ce")
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps must be >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    nrm, loss_fn, clip = get_norm(norm), get_loss(loss), check_clip(clip)
    eps_t, valid = check_inputs(x, y, eps)
    delta_init = check_delta_init(delta_init, x)
    x = x.detach()
    if not bool(valid.all()):
        return on_finite_rows(
            lambda xs, ys, es, di: apgd(model, xs, ys, es, norm=nrm, steps=steps, loss=loss_fn, clip=clip,
                                        model_mode=model_mode, generator=generator, random_start=random_start,
                                        delta_init=di, restarts=restarts, callback=callback),
            x, valid, y, eps_t, delta_init)
    best_x, best_loss = x.clone(), None
    with attack_mode(model, model_mode):
        for r in range(restarts):
            x0 = start_point(x, eps_t, nrm, delta_init=delta_init if r == 0 else None,
                             random_start=random_start or r > 0, clip=clip, generator=generator)
            bx, bl = _apgd_once(model, x, y, eps_t, nrm, steps, loss_fn, clip, x0, callback)
            better = bl > best_loss if best_loss is not None else torch.ones_like(bl, dtype=torch.bool)
            best_x[better] = bx[better]
            best_loss = bl if best_loss is None else torch.maximum(best_loss, bl)
    return best_x.detach()
