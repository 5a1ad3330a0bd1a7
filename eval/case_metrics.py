"""Figures of the case scope, with nnU-Net's own evaluation rules (``nnunetv2/evaluation/evaluate_predictions.py``).

In the case scope a sample is a whole case, predicted as deployed and scored in its original
geometry against its raw label file; the per-case TP / FP / FN (N cases, K foreground classes) are
a :class:`~.metrics.Counts` like the sample scope's. nnU-Net's rules:

* per case and class: Dice = 2TP / (2TP + FP + FN), **NaN when TP + FP + FN = 0** (the class is
  absent from the label and the prediction: ``compute_metrics``); voxels labelled with the ignore
  label are left out of the counts;
* per class over cases: the mean of the defined values (``np.nanmean``, as ``compute_metrics_on_folder``'s
  ``mean``);
* over classes ("mean"): the mean of the per-class means (nnU-Net's ``foreground_mean``; NaN if a
  class is undefined in every case);
* per case over classes (:func:`case_dice`: ``per_case`` rows, paired statistics, the worst case): the
  mean of the case's defined classes, NaN when none is defined (as the e2e tests' reading of
  ``compute_metrics``' output).

So the "mean" row is nnU-Net's ``foreground_mean`` and need not equal the mean of the per-case
figures when a class is absent from some cases. ADI and 3D Dice are the same figure here (a sample is
a case); TVDI pools the counts of all cases (a class absent from every label and prediction: NaN).

>>> s = case_summary(counts)
>>> s["dice3d"]["mean"], s["dice3d_per_case"]
"""
from __future__ import annotations

import warnings

import numpy as np

from .metrics import MEAN, Counts

CONVENTION = "nnunet"  # the adi_convention column of case-scope rows
SAMPLE, CASE = "sample", "case"  # --scope: slices / patch tiles attacked one by one, or whole cases (eval/case_scope.py)
SCOPES = (SAMPLE, CASE)
CASE_KEY_FIELDS = ("scope", "tile_step", "mirroring", "budget")  # what a case-scope result depends on besides the rest


def scope_of(key: dict) -> str:
    """The scope of a run key or result row (rows written before the case scope existed: "sample")."""
    return key.get("scope") or SAMPLE


def class_dice(tp, fp, fn) -> np.ndarray:
    """nnU-Net's Dice per entry: 2TP / (2TP + FP + FN), NaN where TP + FP + FN = 0."""
    tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
    den = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tp + fp + fn > 0, 2 * tp / np.where(den > 0, den, 1), np.nan)


def _nanmean(a: np.ndarray, axis=None):
    with warnings.catch_warnings():  # a class undefined in every case: NaN, as nnU-Net's np.nanmean gives
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def case_dice(c: Counts) -> np.ndarray:
    """(N,) per-case Dice: the mean of the case's defined classes (NaN when none is defined)."""
    d = class_dice(c.tp, c.fp, c.fn)
    return _nanmean(d, axis=1) if d.shape[1] else np.full(c.n, np.nan)


def case_summary(c: Counts) -> dict:
    """The figures of :func:`~.metrics.summarize` for case-scope counts, with nnU-Net's rules (module
    docstring): {"adi", "tvdi", "dice3d": {class: v, "mean": v}, "dice3d_per_case": {case: v},
    "n_samples", "n_empty", "adi_convention": "nnunet"}."""
    d = class_dice(c.tp, c.fp, c.fn)
    k = d.shape[1]
    per_class = {i + 1: float(_nanmean(d[:, i])) if c.n else float("nan") for i in range(k)}
    per_class[MEAN] = float(np.mean([per_class[i + 1] for i in range(k)])) if k and c.n else float("nan")
    pooled = class_dice(c.tp.sum(0), c.fp.sum(0), c.fn.sum(0))
    tvdi = {i + 1: float(pooled[i]) for i in range(k)}
    tvdi[MEAN] = float(_nanmean(pooled)) if k else float("nan")
    gt_empty = (c.tp + c.fn) == 0
    n_empty = {i + 1: int(gt_empty[:, i].sum()) for i in range(k)}
    n_empty[MEAN] = int(gt_empty.all(1).sum())
    per_case = {cid: float(v) for cid, v in zip(c.cases, case_dice(c))}
    return {"adi": dict(per_class), "tvdi": tvdi, "dice3d": per_class, "dice3d_per_case": per_case,
            "n_samples": c.n, "n_empty": n_empty, "adi_convention": CONVENTION}
