"""Norm-bounded iterative attacks with per-sample budgets: PGD and IFGSM.

Both are one kernel, :func:`perturb_iterative` (PGD = random start, IFGSM = start at x, or any
explicit start ``delta_init`` as in advertorch), with the norm as a strategy object
(:mod:`nnunet_ima.norms`) and the loss injectable (:mod:`nnunet_ima.losses`; losses that declare
``uses_progress`` receive the iteration progress k / K, e.g. SegPGD's weighting). Nothing is clipped to
[0, 1] unless ``clip`` says so: nnU-Net inputs are z-scored.
"""
from __future__ import annotations

import torch

from ._model import attack_mode
from .losses import LossFn, evaluate_loss, get_loss
from .norms import Norm, _per_sample, get_norm
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


def _clip(x: torch.Tensor, clip):
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
                clip=None, generator=None) -> torch.Tensor:
    """The first iterate x_0 = clip(x + Pi_eps(delta)) (B, ...): delta = ``delta_init`` when given (projected
    into each sample's ball), else uniform in the ball if ``random_start``, else 0 (x itself)."""
    if delta_init is not None:
        return _clip(x + norm.project(delta_init, eps), clip)
    if random_start:
        return _clip(x + norm.project(norm.random(x, eps, generator), eps), clip)
    return x.clone()


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
        moved = x_adv.detach() + _per_sample(alpha, x) * norm.direction(g)
        return _clip(x + norm.project(moved - x, eps), clip)


def perturb_iterative(model, x, y, eps, *, norm: str | Norm = "l2", steps: int = 10, step_size=None,
                      random_start: bool = False, loss: str | LossFn = "ce", clip=None, model_mode: str = "eval",
                      generator: torch.Generator | None = None, delta_init: torch.Tensor | None = None) -> torch.Tensor:
    """The shared loop of PGD and IFGSM: ``steps`` normalised-gradient ascent steps, projected onto
    each sample's eps-ball. Samples with NaN/Inf are returned unchanged (with a warning).

    Start: ``delta_init`` (B, ...) when given (advertorch's name; projected into each sample's ball,
    ``random_start`` is then ignored), else a uniform random point if ``random_start``, else x."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    norm = get_norm(norm)
    loss_fn = get_loss(loss)
    clip = check_clip(clip)
    eps_t, valid = check_inputs(x, y, eps)
    delta_init = check_delta_init(delta_init, x)
    alpha = resolve_step_size(step_size, eps_t, steps)
    x = x.detach()
    if not bool(valid.all()):
        return on_finite_rows(
            lambda xs, ys, es, al, di: perturb_iterative(
                model, xs, ys, es, norm=norm, steps=steps, step_size=al, random_start=random_start, loss=loss_fn,
                clip=clip, model_mode=model_mode, generator=generator, delta_init=di),
            x, valid, y, eps_t, alpha, delta_init)
    with attack_mode(model, model_mode):
        x_adv = start_point(x, eps_t, norm, delta_init=delta_init, random_start=random_start, clip=clip,
                            generator=generator)
        for k in range(steps):
            _, g = gradient(model, x_adv, y, loss_fn, progress=k / steps)
            x_adv = step(x, x_adv, g, eps_t, alpha, norm, clip)
    return x_adv.detach()


def pgd(model, x, y, eps, *, norm="l2", steps: int = 100, step_size=None, random_start: bool = True,
        loss="ce", clip=None, model_mode: str = "eval", generator=None, delta_init=None) -> torch.Tensor:
    """Projected gradient descent (Madry et al.) with a random start in the eps-ball.

    Shape: x (B, C, *S); y labels (B,) / (B, *S) / (B, 1, *S) or anything the loss accepts;
    eps a float or a (B,) tensor. Returns the adversarial batch, same shape as x.
    Default step size 4 * eps / steps (the papers' alpha). ``delta_init`` (B, ...): an explicit start
    perturbation instead of the random one (e.g. TRADES' x + 0.001 N(0, I)).

    >>> x_adv = pgd(model, x, y, eps=2.0, steps=100)                 # L2, CE loss
    >>> x_adv = pgd(model, x, y, eps=torch.tensor([.5, 1.]), norm="linf", loss="margin")
    >>> x_adv = pgd(model, x, y, eps=1.0, delta_init=0.001 * torch.randn_like(x))
    """
    return perturb_iterative(model, x, y, eps, norm=norm, steps=steps, step_size=step_size, random_start=random_start,
                             loss=loss, clip=clip, model_mode=model_mode, generator=generator, delta_init=delta_init)


def ifgsm(model, x, y, eps, *, norm="l2", steps: int = 10, step_size=None, loss="ce", clip=None,
          model_mode: str = "eval") -> torch.Tensor:
    """Iterative FGSM (Kurakin et al.): PGD without the random start; 10 steps by default."""
    return perturb_iterative(model, x, y, eps, norm=norm, steps=steps, step_size=step_size, random_start=False,
                             loss=loss, clip=clip, model_mode=model_mode)


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
