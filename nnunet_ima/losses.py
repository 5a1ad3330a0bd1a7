"""Attack losses (per sample) and the IMA training losses.

An attack loss is any callable ``loss(output, y) -> Tensor`` returning per-sample losses (B,) (a
scalar is accepted too, e.g. nnU-Net's batch-averaged Dice+CE: its gradient has the same direction
per sample up to scale, which the normalised step h(g) removes). ``output`` is what the model
returns: logits (B, C, ...) or, for nnU-Net with deep supervision, a list whose first element is the
full-resolution logits.

A loss that needs the attack's iteration progress (SegPGD's lambda schedule) declares it with
:func:`uses_progress`; the attack loops call every loss through :func:`evaluate_loss`, which passes
``progress = k / K`` (k = 0..K-1) only to such losses. The segmentation objectives live in
:mod:`nnunet_ima.seg_losses` and are found by :func:`get_loss` by name too.

Pixels that count (one rule for every objective and metric, :func:`valid_pixels`): a label map may
mark pixels that no objective and no Dice counts with :data:`NOT_SCORED` (any negative label), e.g.
padding and nnU-Net's ignore label (:func:`scored_labels` writes it). Their logits change neither a
loss value nor its gradient, and per-pixel means are taken over the counted pixels of each sample.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[object, object], torch.Tensor]


def first(output):
    """Full-resolution output: the tensor itself, or element 0 of a deep-supervision list."""
    return output[0] if isinstance(output, (list, tuple)) else output


def class_target(y, logits: torch.Tensor) -> torch.Tensor:
    """Integer class map matching ``logits`` (B, C, *S): accepts (B, *S), (B, 1, *S) or a list."""
    y = first(y)
    if y.dim() == logits.dim():  # (B, 1, *S) as nnU-Net stores targets
        y = y[:, 0]
    return y.long()


NOT_SCORED = -1  # label of a pixel no objective and no metric counts (padding, nnU-Net's ignore label)


def valid_pixels(labels: torch.Tensor, *, ignore_label: int | None = None, pad: torch.Tensor | None = None) -> torch.Tensor:
    """The one rule for which pixels count, in every objective, the attacks' Dice and the metrics:
    bool, True where the label is >= 0 (not :data:`NOT_SCORED`), is not nnU-Net's ``ignore_label`` and is
    not padding (``pad`` True on padding, the labels' shape without a channel axis). Shape: ``labels``
    (B, *S) or (B, 1, *S); the result has the labels' shape.

    >>> y_attack = scored_labels(y, ignore_label=3, pad=pad)     # what the attacks and the Dice see
    >>> assert torch.equal(valid_pixels(y_attack), valid_pixels(y, ignore_label=3, pad=pad))
    """
    keep = labels >= 0
    if ignore_label is not None:
        keep = keep & (labels != ignore_label)
    if pad is not None:
        keep = keep & ~pad.reshape(keep.shape)
    return keep


def scored_labels(labels: torch.Tensor, *, ignore_label: int | None = None, pad: torch.Tensor | None = None):
    """``labels`` with :data:`NOT_SCORED` wherever :func:`valid_pixels` says a pixel does not count."""
    return torch.where(valid_pixels(labels, ignore_label=ignore_label, pad=pad), labels,
                       torch.full_like(labels, NOT_SCORED))


def target_and_keep(y, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class map with 0 where not counted, bool map of the counted pixels): a safe index for gather /
    cross-entropy, and the mask every per-pixel loss is reduced with (see :func:`masked_mean`)."""
    t = class_target(y, logits)
    keep = valid_pixels(t)
    return torch.where(keep, t, torch.zeros_like(t)), keep


def masked_mean(values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, *S) per-pixel values -> (B,) mean over each sample's counted pixels (``keep``; all if None).
    Values off ``keep`` are replaced, not multiplied, by 0, so neither they nor their gradient reach the
    result, whatever their logits. A (B,) input (classification) is returned as is (masked)."""
    if keep is not None:
        values = torch.where(keep, values, torch.zeros_like(values))
    if values.dim() == 1:
        return values
    n = values[0].numel() if keep is None else keep.flatten(1).sum(1).clamp(min=1).to(values.dtype)
    return values.flatten(1).sum(1) / n


def cross_entropy(output, y) -> torch.Tensor:
    """Per-sample cross-entropy, averaged over the counted pixels/voxels for segmentation outputs."""
    logits = first(output)
    t, keep = target_and_keep(y, logits)
    return masked_mean(F.cross_entropy(logits, t, reduction="none"), keep)


def logit_margin(output, y) -> torch.Tensor:
    """Per-sample logit-margin loss max_{j != y} z_j - z_y (Carlini-Wagner style, un-clamped).

    Positive exactly when the sample (pixel) is misclassified; averaged over the counted pixels for
    segmentation.
    """
    logits = first(output)
    t, keep = target_and_keep(y, logits)
    t1 = t.unsqueeze(1)
    z_y = logits.gather(1, t1)
    other = logits.scatter(1, t1, float("-inf")).amax(1, keepdim=True)
    return masked_mean((other - z_y).squeeze(1), keep)


LOSSES: dict[str, LossFn] = {"ce": cross_entropy, "margin": logit_margin}


def uses_progress(fn):
    """Mark a loss as wanting the iteration progress: it is then called ``fn(output, y, progress=p)``
    with p = k / K in [0, 1) at iteration k of K (see :func:`evaluate_loss`)."""
    fn.uses_progress = True
    return fn


def evaluate_loss(loss_fn: LossFn, output, y, progress: float = 0.0) -> torch.Tensor:
    """``loss_fn(output, y)``, plus ``progress=`` for losses marked with :func:`uses_progress`."""
    if getattr(loss_fn, "uses_progress", False):
        return loss_fn(output, y, progress=progress)
    return loss_fn(output, y)


def get_loss(loss: str | LossFn) -> LossFn:
    """Resolve an attack loss: "ce", "margin", a segmentation objective of
    :data:`nnunet_ima.seg_losses.SEG_LOSSES` ("masked_ce", "js", "segpgd", ...), or any callable
    ``loss(output, y)``."""
    if callable(loss):
        return loss
    from .seg_losses import SEG_LOSSES  # seg_losses builds on this module

    known = {**SEG_LOSSES, **LOSSES}
    if loss not in known:
        raise ValueError(f"loss: unknown loss {loss!r}; use one of {sorted(known)} or a callable loss(output, y)")
    return known[loss]


def ima_loss(loss_clean: torch.Tensor, loss_noisy: torch.Tensor, clean_correct: torch.Tensor | None = None) -> torch.Tensor:
    """IMA loss of the later paper's Algorithm 1: mean over the batch of (L0 + L1) / 2.

    ``loss_clean`` and ``loss_noisy`` are per-sample losses (B,) (scalars are accepted for losses
    that are only defined per batch). Where ``clean_correct`` is False the noisy loss is replaced by
    the clean one (Algorithm 1, line 9: L1 <- L0), so those samples count with their clean loss only.
    """
    if clean_correct is not None and loss_noisy.dim() > 0:
        loss_noisy = torch.where(clean_correct, loss_noisy, loss_clean)
    return ((loss_clean + loss_noisy) / 2).mean()


def ima_beta_loss(loss_clean: torch.Tensor, loss_noisy: torch.Tensor, clean_correct: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Earlier paper's Algorithm 1 loss: ((1 - beta) * (L0 + L1) + beta * L2) / B.

    L0 = summed clean loss of the wrongly classified samples, L1 = summed clean loss of the correct
    ones, L2 = summed loss of the noisy samples (generated for the correct ones only).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    b = loss_clean.shape[0]
    l01 = loss_clean.sum()
    l2 = loss_noisy[clean_correct].sum()
    return ((1 - beta) * l01 + beta * l2) / b
