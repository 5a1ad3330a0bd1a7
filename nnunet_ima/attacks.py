"""Norm-bounded iterative attacks with per-sample budgets: PGD and IFGSM.

Both are one kernel, :func:`perturb_iterative` (PGD = random start, IFGSM = start at x, or any
explicit start ``delta_init`` as in advertorch), with the norm as a strategy object
(:mod:`nnunet_ima.norms`) and the loss injectable (:mod:`nnunet_ima.losses`; losses that declare
``uses_progress`` receive the iteration progress k / K, e.g. SegPGD's weighting). Nothing is clipped to
[0, 1] unless ``clip`` says so: nnU-Net inputs are z-scored.

``best=True`` returns, per sample, the iterate x_0..x_K with the lowest ``score`` (default the
per-sample Dice, :func:`default_score`) instead of the final point: the iterates' outputs exist
already for their gradients, so it costs one forward (of x_K). The papers' protocol is the final
point (``best=False``). ``region`` restricts the perturbation (random start and steps) to part of
the input, e.g. the real image of a padded slice.
"""
from __future__ import annotations

import torch

from ._model import attack_mode
from .losses import LossFn, evaluate_loss, first, get_loss
from .norms import Norm, per_sample_view, as_region, get_norm, restrict
from .predicates import argmax_correct, per_sample_dice
from .validation import check_inputs, on_finite_rows


def resolve_step_size(step_size, eps: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-sample step size (B,): the papers' default alpha = 4 * eps / K, or a float / (B,) tensor."""
    if step_size is None:
        return 4.0 * eps / max(steps, 1)
    if isinstance(step_size, torch.Tensor):
        s = step_size.detach().to(eps.device, torch.float32)
        s = s.expand_as(eps) if s.dim() == 0 else s
        if s.shape != eps.shape:
            raise ValueError(f"step_size: expected a float or a tensor of shape {tuple(eps.shape)}, "
                             f"got shape {tuple(step_size.shape)}")
    else:
        s = torch.full_like(eps, float(step_size))
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"step_size must be finite and >= 0, got {step_size}")
    return s


def clip_to(x: torch.Tensor, clip):
    """``x`` clamped in place to ``clip`` = (lo, hi), or unchanged when ``clip`` is None (z-scored inputs)."""
    return x if clip is None else x.clamp_(clip[0], clip[1])


def check_clip(clip):
    if clip is None:
        return None
    lo, hi = clip
    if not float(lo) < float(hi):
        raise ValueError(f"clip: expected (min, max) with min < max, got {clip!r}")
    return float(lo), float(hi)


def check_delta_init(delta_init, x: torch.Tensor):
    """None, or the start perturbation as a detached tensor of x's shape, dtype and device."""
    if delta_init is None:
        return None
    if not isinstance(delta_init, torch.Tensor) or tuple(delta_init.shape) != tuple(x.shape):
        raise ValueError(f"delta_init: expected a tensor of x's shape {tuple(x.shape)}, "
                         f"got {tuple(getattr(delta_init, 'shape', ())) or type(delta_init).__name__}")
    if not bool(torch.isfinite(delta_init).all()):
        raise ValueError("delta_init: must be finite")
    return delta_init.detach().to(device=x.device, dtype=x.dtype)


def start_point(x: torch.Tensor, eps: torch.Tensor, norm: Norm, *, delta_init=None, random_start: bool = False,
                clip=None, generator=None, region=None) -> torch.Tensor:
    """The first iterate x_0 = clip(x + Pi_eps(delta)) (B, ...): delta = ``delta_init`` when given (projected
    into each sample's ball), else uniform in the ball if ``random_start``, else 0 (x itself); delta is
    0 outside ``region`` (a float mask of x's shape, :func:`nnunet_ima.norms.as_region`; None: everywhere),
    and the random draw spends the whole budget inside it."""
    if delta_init is not None:
        return clip_to(x + norm.project(restrict(delta_init, region), eps), clip)
    if random_start:
        return clip_to(x + norm.project(norm.random(x, eps, generator, region), eps), clip)
    return x.clone()


def default_score(output, y) -> torch.Tensor:
    """The per-sample figure an attack that keeps its best iterate minimises (B,) float64: for a dense
    output the per-sample foreground Dice (:func:`nnunet_ima.predicates.per_sample_dice`, uncounted
    pixels left out); for a (B, C) classifier 1 while the sample is classified correctly, else 0
    (AutoAttack's robust accuracy)."""
    logits = first(output)
    if logits.dim() > 2:
        return per_sample_dice(logits, y)
    return argmax_correct(logits, y).double()


def evaluate_score(score_fn, output, y, b: int) -> torch.Tensor:
    """``score_fn(output, y)`` under no_grad, checked to be per sample (B,)."""
    with torch.no_grad():
        s = torch.as_tensor(score_fn(output, y))
    if s.shape != (b,):
        raise ValueError(f"score: expected per-sample scores of shape ({b},), got {tuple(s.shape)}")
    return s.to(torch.float64)


class BestIterate:
    """Per sample the iterate with the lowest score so far (ties: the later iterate, as SEA's
    ``apgd_train`` keeps its lowest-accuracy point with ``<=``). x (B, ...), score (B,)."""

    def __init__(self, x0: torch.Tensor, s0: torch.Tensor):
        self.x, self.score = x0.detach().clone(), s0.clone()

    def offer(self, x: torch.Tensor, s: torch.Tensor) -> None:
        take = s.to(self.score.device) <= self.score
        self.x[take.to(self.x.device)] = x.detach()[take.to(x.device)]
        self.score = torch.where(take, s.to(self.score.device), self.score)


def _offer(keeper: BestIterate | None, x_adv, out, y, score_fn) -> BestIterate:
    s = evaluate_score(score_fn, out, y, x_adv.shape[0])
    if keeper is None:
        return BestIterate(x_adv, s)
    keeper.offer(x_adv, s)
    return keeper


def gradient(model, x_adv: torch.Tensor, y, loss_fn: LossFn, progress: float = 0.0):
    """One forward + backward to the input. Returns (model output, d loss / d x_adv).

    ``progress`` in [0, 1) is passed to losses that declare ``uses_progress`` (SegPGD's schedule)."""
    x_adv.requires_grad_(True)
    out = model(x_adv)
    loss = evaluate_loss(loss_fn, out, y, progress)
    (g,) = torch.autograd.grad(loss.sum(), x_adv)
    return out, g


def step(x: torch.Tensor, x_adv: torch.Tensor, g: torch.Tensor, eps, alpha, norm: Norm, clip) -> torch.Tensor:
    """x_adv <- Pi_eps(x_adv + alpha * h(g)) around x, then the optional value clip."""
    with torch.no_grad():
        moved = x_adv.detach() + per_sample_view(alpha, x) * norm.direction(g)
        return clip_to(x + norm.project(moved - x, eps), clip)


def perturb_iterative(model, x, y, eps, *, norm: str | Norm = "l2", steps: int = 10, step_size=None,
                      random_start: bool = False, loss: str | LossFn = "ce", clip=None, model_mode: str = "eval",
                      generator: torch.Generator | None = None, delta_init: torch.Tensor | None = None,
                      region=None, best: bool = False, score=None) -> torch.Tensor:
    """The shared loop of PGD and IFGSM: ``steps`` normalised-gradient ascent steps, projected onto
    each sample's eps-ball. Samples with NaN/Inf are returned unchanged (with a warning).

    Start: ``delta_init`` (B, ...) when given (advertorch's name; projected into each sample's ball,
    ``random_start`` is then ignored), else a uniform random point if ``random_start``, else x.
    ``region`` (broadcastable to x): the elements the attack may change. ``best``: return per sample
    the iterate with the lowest ``score(output, y) -> (B,)`` (default :func:`default_score`)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    norm, loss_fn, clip = get_norm(norm), get_loss(loss), check_clip(clip)
    score_fn = score or default_score
    eps_t, valid = check_inputs(x, y, eps)
    delta_init, region = check_delta_init(delta_init, x), as_region(region, x)
    alpha = resolve_step_size(step_size, eps_t, steps)
    x = x.detach()
    if not bool(valid.all()):
        return on_finite_rows(
            lambda xs, ys, es, al, di, rg: perturb_iterative(
                model, xs, ys, es, norm=norm, steps=steps, step_size=al, random_start=random_start, loss=loss_fn,
                clip=clip, model_mode=model_mode, generator=generator, delta_init=di, region=rg, best=best,
                score=score_fn),
            x, valid, y, eps_t, alpha, delta_init, region)
    keeper = None
    with attack_mode(model, model_mode):
        x_adv = start_point(x, eps_t, norm, delta_init=delta_init, random_start=random_start, clip=clip,
                            generator=generator, region=region)
        for k in range(steps):
            out, g = gradient(model, x_adv, y, loss_fn, progress=k / steps)
            if best:  # the iterate x_k, scored off the forward its gradient needed
                keeper = _offer(keeper, x_adv, out, y, score_fn)
            x_adv = step(x, x_adv, restrict(g, region), eps_t, alpha, norm, clip)
        if best:  # x_K: the one forward the final point costs
            with torch.no_grad():
                keeper = _offer(keeper, x_adv, model(x_adv), y, score_fn)
            x_adv = keeper.x
    return x_adv.detach()


def pgd(model, x, y, eps, *, norm="l2", steps: int = 100, step_size=None, random_start: bool = True,
        loss="ce", clip=None, model_mode: str = "eval", generator=None, delta_init=None, region=None,
        best: bool = False, score=None) -> torch.Tensor:
    """Projected gradient descent (Madry et al.) with a random start in the eps-ball.

    Shape: x (B, C, *S); y labels (B,) / (B, *S) / (B, 1, *S) or anything the loss accepts;
    eps a float or a (B,) tensor. Returns the adversarial batch, same shape as x.
    Default step size 4 * eps / steps (the papers' alpha). ``delta_init`` (B, ...): an explicit start
    perturbation instead of the random one (e.g. TRADES' x + 0.001 N(0, I)). ``best=True``: per sample
    the lowest-Dice iterate instead of the final point (see the module docstring); ``region``: where
    the perturbation may go (e.g. (B, 1, *S), 0 on padding).

    >>> x_adv = pgd(model, x, y, eps=2.0, steps=100)                 # L2, CE loss
    >>> x_adv = pgd(model, x, y, eps=torch.tensor([.5, 1.]), norm="linf", loss="margin")
    >>> x_adv = pgd(model, x, y, eps=1.0, delta_init=0.001 * torch.randn_like(x))
    >>> x_adv = pgd(seg_model, x, labels, eps=2.0, best=True)        # the iterate with the lowest Dice
    """
    return perturb_iterative(model, x, y, eps, norm=norm, steps=steps, step_size=step_size, random_start=random_start,
                             loss=loss, clip=clip, model_mode=model_mode, generator=generator, delta_init=delta_init,
                             region=region, best=best, score=score)


def ifgsm(model, x, y, eps, *, norm="l2", steps: int = 10, step_size=None, loss="ce", clip=None,
          model_mode: str = "eval", region=None, best: bool = False, score=None) -> torch.Tensor:
    """Iterative FGSM (Kurakin et al.): PGD without the random start; 10 steps by default."""
    return perturb_iterative(model, x, y, eps, norm=norm, steps=steps, step_size=step_size, random_start=False,
                             loss=loss, clip=clip, model_mode=model_mode, region=region, best=best, score=score)


class Attack:
    """Thin callable binding a model and settings; eps is given per call (it changes per sample).

    >>> attack = PGD(model, norm="l2", steps=100, loss="ce")
    >>> x_adv = attack(x, y, eps=3.0)
    """

    fn = staticmethod(pgd)

    def __init__(self, model, **settings):
        self.model = model
        self.settings = settings

    def __call__(self, x, y, eps):
        return type(self).fn(self.model, x, y, eps, **self.settings)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({args})"


class PGD(Attack):
    fn = staticmethod(pgd)


class IFGSM(Attack):
    fn = staticmethod(ifgsm)
