"""Correctness predicates ``is_correct(output, y) -> bool (B,)`` used by BPGD and the margin store.

* :func:`argmax_correct` - classification: argmax of the logits equals the label.
* :class:`DicePredicate` - segmentation as pseudo-classification (later paper, section 3.5): a
  sample is "correct" when its Dice over the foreground classes is >= a threshold (0.6).

Empty-foreground rule (documented, used everywhere in this project): for one class, when neither
the ground truth nor the prediction contains it, that class is *undefined* for that sample and is
left out of the sample's mean; when the ground truth is empty but the prediction is not, its Dice
is 0 (false positives on a blank slice are an error). A sample whose every class is undefined (a
blank slice predicted blank) has Dice 1: there was nothing to find and nothing was invented.
"""
from __future__ import annotations

import torch

from .losses import class_target, first, valid_pixels


def argmax_correct(output, y) -> torch.Tensor:
    """Classification correctness: ``argmax(logits, 1) == y``; for dense outputs all pixels must match."""
    logits = first(output)
    pred = logits.argmax(1)
    eq = pred == class_target(y, logits)
    return eq.flatten(1).all(1) if eq.dim() > 1 else eq


def tp_fp_fn(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_mask: torch.Tensor | None = None):
    """Per-sample, per-class TP, FP, FN counts (each (B, num_classes)) of integer label maps (B, *S)."""
    classes = torch.arange(num_classes, device=pred.device).view(1, -1, *([1] * (pred.dim() - 1)))
    p = pred.unsqueeze(1) == classes
    g = gt.unsqueeze(1) == classes
    if ignore_mask is not None:
        keep = ~ignore_mask.unsqueeze(1)
        p, g = p & keep, g & keep
    tp = (p & g).flatten(2).sum(2)
    fp = (p & ~g).flatten(2).sum(2)
    fn = (~p & g).flatten(2).sum(2)
    return tp, fp, fn


def dice_from_counts(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """Dice 2TP / (2TP + FP + FN); NaN where the class is absent from both prediction and truth."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    den = 2 * tp + fp + fn
    return torch.where(den > 0, 2 * tp / den.clamp(min=1), torch.full_like(den, float("nan")))


def per_sample_dice(output, y, *, ignore_label: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """Per-sample Dice over the foreground classes (1..C-1) of a segmentation output.

    Shape: ``output`` logits (B, C, *S) (or a deep-supervision list), ``y`` labels (B, *S) or
    (B, 1, *S). Returns (B,) float64. ``reduction`` is "mean" or "max" over the defined classes;
    see the module docstring for the empty-foreground rule. Pixels that do not count
    (:func:`nnunet_ima.losses.valid_pixels`: labelled ``NOT_SCORED`` or ``ignore_label``) are left out.
    """
    logits = first(output)
    gt = class_target(y, logits)
    pred = logits.argmax(1)
    keep = valid_pixels(gt, ignore_label=ignore_label)
    gt = torch.where(keep, gt, torch.zeros_like(gt))
    tp, fp, fn = tp_fp_fn(pred, gt, logits.shape[1], ~keep)
    return reduce_classes(dice_from_counts(tp[:, 1:], fp[:, 1:], fn[:, 1:]), reduction)


REDUCTIONS = ("mean", "max")


def reduce_classes(d: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The project's one rule for a Dice over classes: ``d`` (..., K) per-class Dice with NaN where a
    class is undefined (absent from truth and prediction); "mean" or "max" over the defined entries
    of the last axis; 1 where every entry is undefined (see the module docstring)."""
    defined = ~torch.isnan(d)
    if reduction == "mean":
        s = torch.where(defined, d, torch.zeros_like(d)).sum(-1)
        out = s / defined.sum(-1).clamp(min=1)
    elif reduction == "max":
        out = torch.where(defined, d, torch.full_like(d, -1.0)).amax(-1)
    else:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return torch.where(defined.any(-1), out, torch.ones_like(out))


class DicePredicate:
    """Segmentation pseudo-classification: correct when per-sample foreground Dice >= ``threshold``.

    >>> is_correct = DicePredicate(threshold=0.6)
    >>> flags = is_correct(logits, target)   # bool (B,)
    """

    def __init__(self, threshold: float = 0.6, reduction: str = "mean", ignore_label: int | None = None):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if reduction not in ("mean", "max"):
            raise ValueError(f"reduction must be 'mean' or 'max', got {reduction!r}")
        self.threshold = float(threshold)
        self.reduction = reduction
        self.ignore_label = ignore_label

    def dice(self, output, y) -> torch.Tensor:
        return per_sample_dice(output, y, ignore_label=self.ignore_label, reduction=self.reduction)

    def __call__(self, output, y) -> torch.Tensor:
        return self.dice(output, y) >= self.threshold

    def __repr__(self) -> str:
        return f"DicePredicate(threshold={self.threshold}, reduction={self.reduction!r})"
