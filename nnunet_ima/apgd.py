"""APGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Algorithm 1) for any per-sample loss, L2 and Linf, per-sample eps,
run for segmentation as SEA runs it (Croce, Singh & Hein, ECCV 2024, "Towards reliable evaluation
and fast training of robust semantic segmentation models").

Which detail follows whom:

* **Croce & Hein's paper** (and AutoAttack's ``autopgd_base.py``, ``attack_single_run``): every
  sample starts with eta = 2 eps and halves it at checkpoints w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), when
  condition 1: fewer than rho = 0.75 of the steps since the last checkpoint increased the loss, or
  condition 2: eta was not halved at the last checkpoint and the best loss has not grown since;
  after a halving the sample restarts from its best point (highest loss) with that point's gradient.
  The update has momentum alpha = 0.75: z = P(x_k + eta h(g_k)), x_{k+1} = P(x_k + alpha (z - x_k)
  + (1 - alpha)(x_k - x_{k-1})) (the first step has none). h(g) is the norm's steepest-ascent
  direction (unit L2 gradient, or sign). After a restart, condition 1 compares the next loss with
  f(x_max), as the paper's Algorithm 1 writes it (AutoAttack's code compares with the last iterate's).
* **SEA** (``semseg/attacker.py`` of nmndeep/Robust-Segmentation: ``apgd_train``,
  ``apgd_largereps``, ``apgd_restarts``; settings of ``tools/infer.py``):
  - the gradient is the objective's (masked CE, balanced masked CE, JS, ...), but the step-size
    control (the loss increases it counts, the best point, the restarts from it) reads a second loss,
    ``track_loss`` (SEA: ``"ce-avg"``, the average CE over the counted pixels, which does not drop a
    pixel once it flips as the masked losses do); one forward serves both;
  - the point returned is, per sample, the iterate with the lowest ``score`` (SEA: the per-sample
    pixel accuracy; here the reported metric, the per-sample Dice, :func:`nnunet_ima.attacks.default_score`
    or the caller's); ties go to the later iterate (SEA's ``<=``), so what the run found is kept
    even when a masked loss has moved on to the pixels that are still right;
  - Linf: the radius shrinks over the run, 2 eps, 1.5 eps, eps over 30 / 30 / 40 % of the
    iterations (``int(0.3 N)``, ``int(0.3 N)``, the rest); each stage is a fresh APGD run (eta = 2
    radius, its own checkpoints) started from the previous stage's returned point projected onto the
    new ball, the first from the random start in the 2 eps ball. Only the last stage's points lie in
    the eps-ball, so its lowest-score iterate is returned. SEA defines the schedule for Linf only;
    L2 runs one stage (``radius_schedule`` changes either);
  - restarts keep, per sample, the lowest score (``apgd_restarts``: a later restart must be strictly lower).
* **Ours**: per-sample eps, any :class:`~nnunet_ima.norms.Norm`, explicit ``clip`` (no [0, 1]),
  ``region`` (the perturbation stays on the real image of padded inputs), a uniform random start in
  the ball (SEA's Linf start is uniform in the box too; AutoAttack starts on the sphere).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._model import attack_mode
from .attacks import BestIterate, clip_to, check_clip, check_delta_init, default_score, evaluate_score, start_point
from .losses import evaluate_loss, get_loss
from .norms import Norm, per_sample_view, as_region, get_norm, restrict
from .validation import check_inputs, on_finite_rows

RHO = 0.75       # condition 1: fraction of successful steps below which eta halves
MOMENTUM = 0.75  # alpha of the momentum update
SEA_LINF_SCHEDULE = ((0.3, 2.0), (0.3, 1.5), (0.4, 1.0))  # (share of the iterations, radius / eps), SEA
ONE_STAGE = ((1.0, 1.0),)


def checkpoints(steps: int) -> list[int]:
    """The paper's checkpoints w_j = ceil(p_j * steps), j >= 1, that lie within ``steps``."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    ws = {math.ceil(round(pj * steps, 9)) for pj in p[1:]}  # round: 0.57 * 100 is 57.000000001 in floats
    return sorted(w for w in ws if 0 < w <= steps)


def resolve_schedule(radius_schedule, norm: Norm) -> tuple:
    """The (share, radius factor) stages: None = SEA's (Linf: 2, 1.5, 1 eps over 30/30/40 %; L2: one
    stage at eps); ``()`` = one stage. The last factor must be 1: the returned point lies in the eps-ball."""
    if radius_schedule is None:
        return SEA_LINF_SCHEDULE if norm.name == "linf" else ONE_STAGE
    stages = tuple((float(s), float(f)) for s, f in radius_schedule) or ONE_STAGE
    if stages[-1][1] != 1.0 or any(s < 0 or f <= 0 for s, f in stages):
        raise ValueError(f"radius_schedule: expected (share >= 0, factor > 0) pairs ending with factor 1, "
                         f"got {radius_schedule!r}")
    return stages


def stage_steps(stages: tuple, steps: int) -> list[int]:
    """Iterations per stage: ``int(share * steps)`` for all but the last, which takes the rest (SEA)."""
    n = [int(share * steps) for share, _ in stages[:-1]]
    return n + [steps - sum(n)]


@dataclass
class APGDState:
    """What a ``callback(state)`` sees after each iterate k of each stage (k = 0: the stage's start).

    x_adv (B, ...): the iterate x_k; eps (B,): the stage's radius; loss (B,): the objective at x_k;
    track_loss (B,): the step-size loss at x_k; best_loss (B,): its highest value so far (the point a
    halving restarts from); score (B,): the score at x_k; best_score (B,): the lowest score so far (that
    iterate is what the last stage returns); step_size (B,): eta for the next step; halved (B,) bool:
    eta was halved (and the sample restarted from its best point) at k."""
    k: int
    stage: int
    x_adv: torch.Tensor
    eps: torch.Tensor
    loss: torch.Tensor
    track_loss: torch.Tensor
    best_loss: torch.Tensor
    score: torch.Tensor
    best_score: torch.Tensor
    step_size: torch.Tensor
    halved: torch.Tensor


def _check_per_sample(loss: torch.Tensor, b: int, what: str = "loss"):
    if loss.shape != (b,):
        raise ValueError(f"{what}: APGD needs per-sample losses of shape ({b},) to keep each sample's best "
                         f"point, got shape {tuple(loss.shape)}")


@dataclass
class _Problem:
    """What every stage of one APGD call shares: model, x, y, norm, the three functions, clip, region."""
    model: object
    x: torch.Tensor
    y: object
    norm: Norm
    objective: object
    track: object
    score: object
    clip: object
    region: torch.Tensor | None
    callback: object

    def evaluate(self, x_adv, progress: float, need_grad: bool):
        """One forward at x_adv: (objective (B,), its input gradient or None, step-size loss (B,), score (B,))."""
        b = x_adv.shape[0]
        x_adv = x_adv.detach().requires_grad_(need_grad)
        with torch.set_grad_enabled(need_grad):
            out = self.model(x_adv)
            obj = evaluate_loss(self.objective, out, self.y, progress)
            _check_per_sample(obj, b)
            g = restrict(torch.autograd.grad(obj.sum(), x_adv)[0], self.region) if need_grad else None
        with torch.no_grad():
            track = obj if self.track is None else evaluate_loss(self.track, out, self.y, progress)
        _check_per_sample(track, b, "track_loss")
        return obj.detach(), g, track.detach(), evaluate_score(self.score, out, self.y, b)

    def project(self, z: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return clip_to(self.x + self.norm.project(z - self.x, eps), self.clip)


class _Run:
    """The per-sample step-size state of one APGD run (x_k, x_{k-1}, gradient, best point by the
    step-size loss, eta, checkpoints)."""

    def __init__(self, problem: _Problem, x0, loss0, g0, eps):
        self.problem, self.eps = problem, eps
        self.cur, self.prev, self.g = x0, x0, g0
        self.loss = loss0
        self.best_x, self.best_loss = x0.clone(), loss0.clone()
        self.best_g = None if g0 is None else g0.clone()  # None when steps = 0
        self.eta = 2.0 * eps
        self.ups = torch.zeros_like(loss0)               # loss increases since the last checkpoint
        self.best_at_check = loss0.clone()               # f_max at the last checkpoint
        self.halved_at_check = torch.zeros_like(loss0, dtype=torch.bool)
        self.last_check = 0

    def propose(self, first: bool) -> torch.Tensor:
        """x_{k+1} from x_k, x_{k-1} and g_k (momentum, then projection)."""
        p = self.problem
        with torch.no_grad():
            z = p.project(self.cur + per_sample_view(self.eta, self.cur) * p.norm.direction(self.g), self.eps)
            if first:
                return z
            a = MOMENTUM
            return p.project(self.cur + a * (z - self.cur) + (1 - a) * (self.cur - self.prev), self.eps)

    def accept(self, x_new, loss_new, g_new):
        """Move to x_{k+1}: count a loss increase, keep the best point (by the step-size loss) per sample."""
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
        self.cur = torch.where(per_sample_view(halve, self.cur).bool(), self.best_x, self.cur)
        self.g = torch.where(per_sample_view(halve, self.g).bool(), self.best_g, self.g)
        self.loss = torch.where(halve, self.best_loss, self.loss)  # the next step is compared with f(x_max)
        self.halved_at_check, self.best_at_check = halve, self.best_loss.clone()
        self.ups.zero_()
        self.last_check = k
        return halve


def _apgd_once(p: _Problem, eps, steps: int, x0, stage: int):
    """One APGD run from x0 inside the radius ``eps`` (B,). Returns (lowest-score iterate (B, ...), its score (B,))."""
    obj, g, track, score = p.evaluate(x0, 0.0, steps > 0)
    run = _Run(p, x0.detach(), track, g, eps)
    kept = BestIterate(x0, score)
    no = torch.zeros_like(track, dtype=torch.bool)
    checks = set(checkpoints(steps))
    x_k, halved = x0, no
    for k in range(steps + 1):
        if k:
            x_k = run.propose(first=(k == 1))
            obj, g, track, score = p.evaluate(x_k, min(k, steps - 1) / steps, k < steps)
            run.accept(x_k, track, g)
            kept.offer(x_k, score)
            halved = run.checkpoint(k) if (k in checks and k < steps) else no
        if p.callback is not None:
            p.callback(APGDState(k, stage, x_k, eps, obj, track, run.best_loss, score, kept.score, run.eta, halved))
    return kept.x, kept.score


def _stages(p: _Problem, eps, steps: int, stages: tuple, x_start):
    """Run the radius schedule (one APGD run per stage, each from the previous stage's returned point
    projected onto its ball); returns the last stage's (point, score)."""
    n_steps = stage_steps(stages, steps)
    cur, score = x_start, None
    for i, ((_, factor), n) in enumerate(zip(stages, n_steps)):
        radius = eps * factor
        x0 = cur if i == 0 else p.project(cur, radius)
        if n == 0 and i < len(stages) - 1:
            cur = x0  # a stage without iterations passes its start on
            continue
        cur, score = _apgd_once(p, radius, n, x0, i)
    return cur, score


def apgd(model, x, y, eps, *, norm="l2", steps: int = 100, loss="ce", track_loss=None, score=None, clip=None,
         model_mode: str = "eval", generator: torch.Generator | None = None, random_start: bool = True,
         delta_init=None, restarts: int = 1, radius_schedule=None, region=None, callback=None) -> torch.Tensor:
    """APGD maximising a per-sample ``loss``; returns per sample its lowest-``score`` iterate (see the
    module docstring for what follows Croce & Hein and what follows SEA).

    Shape: x (B, C, *S) (2d or 3d), y what the loss takes (labels (B, *S) / (B, 1, *S)); eps a float
    or a (B,) tensor. ``loss``: a name of :func:`nnunet_ima.losses.get_loss` ("ce", "masked_ce",
    "balanced_masked_ce", "js", ...) or a callable returning (B,); ``track_loss``: the loss the step
    size follows (None: ``loss`` itself, Croce & Hein; SEA: "ce"); ``score(output, y) -> (B,)``: what
    the returned iterate minimises (default the per-sample Dice, or correctness for a classifier).
    ``radius_schedule``: (share, radius / eps) stages; None = SEA's (Linf: 2, 1.5, 1 eps; L2: none).
    Start: ``delta_init`` if given, else uniform in the ball (``random_start``) or x. ``restarts`` > 1
    runs again from new random starts and keeps per sample the lowest score. ``region``
    (broadcastable to x): the elements the attack may change. ``callback(state)`` sees an
    :class:`APGDState` after every iterate of every stage and restart.

    >>> x_adv = apgd(model, x, y, eps=1.0, norm="l2", steps=100, loss="masked_ce", track_loss="ce")
    """
    if steps < 0 or restarts < 1:
        raise ValueError(f"steps must be >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    nrm, clip = get_norm(norm), check_clip(clip)
    loss_fn, track_fn = get_loss(loss), None if track_loss is None else get_loss(track_loss)
    stages = resolve_schedule(radius_schedule, nrm)
    eps_t, valid = check_inputs(x, y, eps)
    delta_init, region = check_delta_init(delta_init, x), as_region(region, x)
    x = x.detach()
    if not bool(valid.all()):
        return on_finite_rows(
            lambda xs, ys, es, di, rg: apgd(model, xs, ys, es, norm=nrm, steps=steps, loss=loss_fn, track_loss=track_fn,
                                            score=score, clip=clip, model_mode=model_mode, generator=generator,
                                            random_start=random_start, delta_init=di, restarts=restarts,
                                            radius_schedule=stages, region=rg, callback=callback),
            x, valid, y, eps_t, delta_init, region)
    p = _Problem(model, x, y, nrm, loss_fn, track_fn, score or default_score, clip, region, callback)
    best = None
    with attack_mode(model, model_mode):
        for r in range(restarts):
            x0 = start_point(x, eps_t * stages[0][1], nrm, delta_init=delta_init if r == 0 else None,
                             random_start=random_start or r > 0, clip=clip, generator=generator, region=region)
            bx, bs = _stages(p, eps_t, steps, stages, x0)
            if best is None:
                best = BestIterate(bx, bs)
            else:  # a later restart replaces a sample's point only when strictly lower (SEA's apgd_restarts)
                lower = bs < best.score
                best.x[lower] = bx[lower]
                best.score = torch.where(lower, bs, best.score)
    return best.x.detach()
