"""BPGD: PGD inside each sample's current margin, then a binary search onto the decision boundary.

* ``variant="boundary"`` - later paper, Algorithm 2: a sample leaves the PGD loop as soon as an
  iterate is wrong; binary search between the last correct and the first wrong iterate. The
  correctness of iterate k is read off the forward pass that step k+1 needs for its gradient, so
  the check costs no extra forward (one final forward checks the last iterate).
* ``variant="augment"`` - Algorithm 3 (for data augmentation): all K steps, then binary search
  between x and the final PGD point.

The binary search (``search_steps`` = N forwards) runs under ``no_grad`` and returns the midpoint
of the last (correct, wrong) bracket, exactly as the papers' BinarySearch does.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ._model import attack_mode
from .attacks import clip_to, check_clip, gradient, resolve_step_size, step
from .losses import LossFn, get_loss
from .norms import Norm, get_norm
from .predicates import argmax_correct
from .validation import batch_index, check_inputs

VARIANTS = ("boundary", "augment")


class BPGDResult(NamedTuple):
    """x_adv (B, ...): noisy samples; crossed (B,) bool: a wrong point was found, so x_adv lies on
    the boundary (within the search resolution); distance (B,): ||x_adv - x|| in the attack norm;
    valid (B,) bool: False for samples with NaN/Inf, which were not attacked."""

    x_adv: torch.Tensor
    crossed: torch.Tensor
    distance: torch.Tensor
    valid: torch.Tensor


@torch.no_grad()
def binary_search(model, lo: torch.Tensor, hi: torch.Tensor, y, is_correct: Callable, steps: int = 10) -> torch.Tensor:
    """Papers' BinarySearch: ``lo`` correct, ``hi`` wrong; N forwards; returns the final midpoint."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = is_correct(model(mid), y).view(-1, *([1] * (lo.dim() - 1)))
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return (lo + hi) / 2


def bpgd(model, x, y, eps, *, norm: str | Norm = "l2", steps: int = 20, search_steps: int = 10,
         variant: str = "boundary", is_correct: Callable | None = None, random_start: bool = False,
         step_size=None, loss: str | LossFn = "ce", clip=None, model_mode: str = "eval",
         generator: torch.Generator | None = None) -> BPGDResult:
    """Binary-search PGD of the IMA papers (Algorithms 2 and 3), batched with per-sample eps.

    Shape: x (B, C, *S), y whatever ``loss`` and ``is_correct`` accept (labels (B,) by default),
    eps float or (B,). ``is_correct(output, y) -> bool (B,)`` defaults to argmax == y; pass
    :class:`~nnunet_ima.predicates.DicePredicate` for segmentation. The papers' BPGD starts at x;
    ``random_start=True`` starts at a random point of the ball, as the authors' code does.

    >>> res = bpgd(model, x, y, eps=margins.get(ids), steps=20, search_steps=10)
    >>> res.x_adv, res.crossed, res.distance
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if steps < 0 or search_steps < 0:
        raise ValueError(f"steps and search_steps must be >= 0, got {steps}, {search_steps}")
    norm = get_norm(norm)
    loss_fn = get_loss(loss)
    is_correct = is_correct or argmax_correct
    clip = check_clip(clip)
    eps_t, valid = check_inputs(x, y, eps)
    alpha = resolve_step_size(step_size, eps_t, steps)
    x = x.detach()
    x_adv = x.clone()
    crossed = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    idx = torch.nonzero(valid).flatten()
    if idx.numel():
        run = _boundary if variant == "boundary" else _augment
        with attack_mode(model, model_mode):  # the binary search too: its forwards are attack forwards
            lo, hi, hit, rest, rest_x = run(model, x, y, eps_t, alpha, idx, norm, loss_fn, is_correct, steps, clip,
                                            random_start, generator)
            x_adv[rest] = rest_x
            if hit.numel():
                x_adv[hit] = binary_search(model, lo, hi, batch_index(y, hit), is_correct, search_steps)
                crossed[hit] = True
    return BPGDResult(x_adv, crossed, norm.measure(x_adv - x), valid)


def _start(x, eps, norm, random_start, clip, generator):
    if not random_start:
        return x.clone()
    return clip_to(x + norm.project(norm.random(x, eps, generator), eps), clip)


def _boundary(model, x, y, eps, alpha, idx, norm, loss_fn, is_correct, steps, clip, random_start, generator):
    """Algorithm 2 with an active set. Returns (lo, hi, crossed ids, other ids, their final points)."""
    lo_parts, hi_parts, hit_parts = [], [], []
    act = idx
    x_a, y_a, e_a, a_a = x[act], batch_index(y, act), eps[act], alpha[act]
    prev = x_a  # the iterate before ``cur``; x itself before the first step
    cur = _start(x_a, e_a, norm, random_start, clip, generator)
    for k in range(steps + 1):
        if k < steps:
            out, g = _grad_keep_out(model, cur, y_a, loss_fn)
        else:
            with torch.no_grad():
                out = model(cur)
        with torch.no_grad():
            ok = is_correct(out, y_a)
        if not bool(ok.all()):
            bad = ~ok
            lo_parts.append(prev[bad])
            hi_parts.append(cur.detach()[bad])
            hit_parts.append(act[bad])
            act, x_a, y_a, e_a, a_a = act[ok], x_a[ok], batch_index(y_a, ok), e_a[ok], a_a[ok]
            cur, g = cur.detach()[ok], (g[ok] if k < steps else None)
        if k == steps or act.numel() == 0:
            break
        prev = cur.detach()
        cur = step(x_a, prev, g, e_a, a_a, norm, clip)
    hit = torch.cat(hit_parts) if hit_parts else idx[:0]
    lo = torch.cat(lo_parts) if lo_parts else x[:0]
    hi = torch.cat(hi_parts) if hi_parts else x[:0]
    return lo, hi, hit, act, cur.detach()


def _grad_keep_out(model, cur, y, loss_fn):
    cur = cur.detach()
    return gradient(model, cur, y, loss_fn)


def _augment(model, x, y, eps, alpha, idx, norm, loss_fn, is_correct, steps, clip, random_start, generator):
    """Algorithm 3: K steps for every sample, then search between x and the final point."""
    x_a, y_a, e_a, a_a = x[idx], batch_index(y, idx), eps[idx], alpha[idx]
    cur = _start(x_a, e_a, norm, random_start, clip, generator)
    for _ in range(steps):
        _, g = _grad_keep_out(model, cur, y_a, loss_fn)
        cur = step(x_a, cur, g, e_a, a_a, norm, clip)
    with torch.no_grad():
        ok = is_correct(model(cur), y_a)
    bad = ~ok
    return x_a[bad], cur[bad], idx[bad], idx[ok], cur[ok]
