"""Gradient-free baselines of the attack-strength sanity checks (segmentation or classification, 2d or 3d):
the white-box attacks must beat :func:`random_noise` (a random point on the ball's boundary) and
:func:`random_search` (Square-style random search; Andriushchenko et al. 2020) must not beat them.
The evaluation's attack registry (names, step settings) lives with the evaluation:
``nnunet_ima_eval.attacks.ATTACKS``.
"""
from __future__ import annotations

import torch

from ._model import attack_mode
from .attacks import clip_to, check_clip
from .losses import get_loss
from .norms import Norm, per_sample_view, as_region, get_norm
from .validation import check_inputs, on_finite_rows


def random_noise(model, x, y, eps, *, norm="l2", generator=None, clip=None, region=None) -> torch.Tensor:
    """x + a random perturbation on the boundary of each sample's ball (the full budget: a normalised
    Gaussian of L2 norm eps, or a random vertex +-eps for Linf), inside ``region`` when given. ``model``
    and ``y`` are not used (same signature as the attacks). The sanity check: the white-box attacks
    must beat this."""
    nrm, clip = get_norm(norm), check_clip(clip)
    eps_t, valid = check_inputs(x, y, eps)
    region = as_region(region, x)

    return on_finite_rows(lambda xs, es, rg: clip_to(xs.detach() + nrm.boundary(xs, es, generator, rg), clip),
                          x, valid, eps_t, region)


def square_fraction(i: int, queries: int, p_init: float) -> float:
    """Square attack's schedule of the window's share of the pixels, rescaled to ``queries``: p_init
    halves at (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000) of 10 000 queries."""
    it = int(i / max(queries, 1) * 10000)
    halvings = sum(it > t for t in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2 ** halvings


def _gen_device(generator, like: torch.Tensor):
    """Draw random numbers where the generator lives (CPU generators on CUDA inputs), then move them."""
    return generator.device if generator is not None else like.device


def window_mask(x: torch.Tensor, frac: float, generator=None) -> torch.Tensor:
    """(B, 1, *S) bool: one random cube per sample (side ~ (frac * prod(S))^(1/d), d spatial dims)."""
    spatial = x.shape[2:]
    n = 1
    for s in spatial:
        n *= s
    side = max(1, round((frac * n) ** (1.0 / len(spatial))))
    mask = torch.ones((x.shape[0], 1, *spatial), dtype=torch.bool, device=x.device)
    for d, size in enumerate(spatial):
        s = min(side, size)
        start = torch.randint(0, size - s + 1, (x.shape[0],), generator=generator,
                              device=_gen_device(generator, x)).to(x.device)
        idx = torch.arange(size, device=x.device)
        inside = (idx >= start[:, None]) & (idx < start[:, None] + s)  # (B, size)
        shape = [x.shape[0]] + [1] * (len(spatial) + 1)
        shape[2 + d] = size
        mask = mask & inside.view(shape)
    return mask


def _resample_linf(delta, mask, eps, generator):
    """Square (Linf): the window gets +-eps, one random sign per sample and channel."""
    u = torch.rand(delta.shape[:2], generator=generator, device=_gen_device(generator, delta)).to(delta.device)
    signs = torch.where(u < 0.5, -1.0, 1.0).to(delta.dtype).view(*delta.shape[:2], *([1] * (delta.dim() - 2)))
    return torch.where(mask, signs * per_sample_view(eps, delta), delta)


def _resample_l2(delta, mask, eps, generator):
    """L2: the window gets a new Gaussian pattern of the same L2 mass (the total norm is kept)."""
    m = mask.to(delta.dtype)
    old = (delta * m).flatten(1).norm(dim=1)
    g = torch.randn(delta.shape, generator=generator, device=_gen_device(generator, delta))
    g = g.to(delta.device, delta.dtype) * m
    new = g / (g.flatten(1).norm(dim=1) + 1e-12).view(-1, *([1] * (delta.dim() - 1))) * per_sample_view(old, delta)
    return delta * (1 - m) + new


_RESAMPLE = {"linf": _resample_linf, "l2": _resample_l2}


def random_search(model, x, y, eps, *, norm="l2", queries: int = 1000, score=None, generator=None,
                  p_init: float = 0.1, clip=None, model_mode: str = "eval", region=None) -> torch.Tensor:
    """Gradient-free Square-style random search: start on the ball's boundary, then ``queries`` - 1
    times resample one random window (cube of Square's shrinking size) per sample and keep the change
    where the score rises. ``score(output, y) -> (B,)`` is MAXIMISED (a loss name of
    :func:`nnunet_ima.losses.get_loss` or a callable, e.g. minus the Dice; default per-pixel CE).
    One forward per query; the windows stay inside ``region`` when given. The sanity check: it must
    not beat the white-box attacks."""
    nrm, clip = get_norm(norm), check_clip(clip)
    if nrm.name not in _RESAMPLE or queries < 1:
        raise ValueError(f"random_search: norm must be one of {sorted(_RESAMPLE)} and queries >= 1, "
                         f"got {nrm.name!r}, {queries}")
    score_fn = get_loss(score or "ce")
    eps_t, valid = check_inputs(x, y, eps)
    kw = dict(norm=nrm, queries=queries, score_fn=score_fn, generator=generator, p_init=p_init, clip=clip)
    with attack_mode(model, model_mode), torch.no_grad():
        return on_finite_rows(lambda xs, ys, es, rg: _search(model, xs.detach(), ys, es, region=rg, **kw), x, valid,
                              y, eps_t, as_region(region, x))


def _search(model, x, y, eps, *, norm: Norm, queries, score_fn, generator, p_init, clip, region):
    def evaluate(delta):
        s = score_fn(model(clip_to(x + delta, clip)), y)
        if s.shape != (x.shape[0],):
            raise ValueError(f"score: expected per-sample scores of shape ({x.shape[0]},), got {tuple(s.shape)}")
        return s

    delta = norm.boundary(x, eps, generator, region)
    best = evaluate(delta)
    for i in range(1, queries):
        mask = window_mask(x, square_fraction(i, queries, p_init), generator)
        if region is not None:
            mask = mask & (region[:, :1] > 0)
        cand = norm.project(_RESAMPLE[norm.name](delta, mask, eps, generator), eps)
        s = evaluate(cand)
        better = s > best
        delta = torch.where(per_sample_view(better, delta).bool(), cand, delta)
        best = torch.where(better, s, best)
    return clip_to(x + delta, clip)
