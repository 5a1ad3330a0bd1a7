"""Segmentation figures of the papers from per-sample TP / FP / FN counts.

Every figure is computed from one table of counts ``tp, fp, fn`` of shape (N, K): N samples
(2d: slices; 3d: patch tiles), K foreground classes (labels 1..K). Counting itself is the kernel's
:func:`nnunet_ima.predicates.tp_fp_fn` (padding and nnU-Net's ignore label masked out).

* ``adi``   - Average Dice Index, later paper eq. 14 / earlier paper eq. 10: the mean over samples
  of the per-sample Dice. Per class: the sample's Dice of that class. Over classes ("mean"): the
  sample's Dice averaged over its foreground classes (exactly :func:`nnunet_ima.predicates.per_sample_dice`,
  the predicate IMA trains with), then averaged over samples.
* ``tvdi``  - Total Voxel Dice Index, earlier paper eq. 9: 2 sum TP / (2 sum TP + sum FP + sum FN),
  counts pooled over all samples, per class. Over classes: the mean of the per-class TVDIs, as in
  nnU-Net's online evaluation (the "pseudo Dice" the earlier paper says TVDI is).
* ``dice3d`` - the clinical per-case Dice: counts summed over the samples of one case (slices or
  tiles partition the volume, so this *is* the Dice of the stacked 3D prediction), the case's Dice
  per class / averaged over classes, then the mean over cases.

Empty-foreground rule (the project's one rule, :mod:`nnunet_ima.predicates`): a class that is absent
from both the ground truth and the prediction of a sample (or case, or pooled set) is *undefined*
there and is left out of any mean over classes; ground truth empty but prediction not gives 0
(false positives on a blank slice are an error); a sample whose classes are all undefined (a blank
slice predicted blank) counts as Dice 1 (nothing to find, nothing invented). For a per-class figure
the same rule applies to that one class: an undefined sample counts 1. Why count such samples at
all: removing them would reward a model for hallucinating structures on blank slices less than for
missing real ones, and the count of blank samples is reported (``n_empty``) so readers can judge how
much of an ADI comes from them.

ADI conventions (``--adi``): "project" is the rule above. "paper" is the authors' code
(``getOnlineDiceMean`` in their nnU-Net v1 fork), which the paper's tables were computed with: per
sample and foreground class 2TP / (2TP + FP + FN + 1e-8), so a class absent from truth and
prediction scores 0, not 1; mean over classes, then over samples; samples whose ground truth has no
foreground are skipped. (The authors skip a whole *batch* without foreground; batch composition is
theirs, so this tool skips per sample, which does not depend on ``--batch-size``.) On datasets with
classes absent from most slices the paper's ADI lies below the project's and below the TVDI. TVDI and
3D Dice do not depend on the convention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from nnunet_ima.predicates import dice_from_counts, reduce_classes

MEAN = "mean"  # the class name under which figures averaged over foreground classes are stored


def _dice(tp, fp, fn) -> np.ndarray:
    """Dice per entry, NaN where undefined (the kernel's :func:`dice_from_counts`)."""
    t = dice_from_counts(torch.as_tensor(np.asarray(tp)), torch.as_tensor(np.asarray(fp)),
                         torch.as_tensor(np.asarray(fn)))
    return t.numpy()


def _over_classes(d: np.ndarray) -> np.ndarray:
    """The project's one rule (:func:`nnunet_ima.predicates.reduce_classes`): mean over the last axis
    of the defined entries; 1 where every entry is undefined."""
    return reduce_classes(torch.as_tensor(np.asarray(d, np.float64)), "mean").numpy()


def _undefined_is_one(d: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(d), 1.0, d)


ADI_CONVENTIONS = ("project", "paper")
DEFAULT_ADI = "project"
PAPER_SMOOTH = 1e-8  # the authors' getOnlineDiceMean: 2TP / (2TP + FP + FN + 1e-8)


def check_convention(convention: str) -> str:
    if convention not in ADI_CONVENTIONS:
        raise ValueError(f"ADI convention must be one of {ADI_CONVENTIONS}, got {convention!r}")
    return convention


def paper_class_dice(tp, fp, fn) -> np.ndarray:
    """The authors' per-sample, per-class Dice 2TP / (2TP + FP + FN + 1e-8): an absent class scores 0."""
    tp, fp, fn = (np.asarray(a, np.float64) for a in (tp, fp, fn))
    return 2 * tp / (2 * tp + fp + fn + PAPER_SMOOTH)


def scored_samples(c: "Counts", convention: str = DEFAULT_ADI) -> np.ndarray:
    """(N,) bool: the samples an ADI averages over. "project": all; "paper": those whose ground truth
    has some foreground (the authors skip targets without foreground)."""
    if check_convention(convention) == "project":
        return np.ones(c.n, bool)
    return ((c.tp + c.fn) > 0).any(1)


@dataclass
class Counts:
    """Per-sample TP / FP / FN (N, K) of the K foreground classes, with each sample's case id."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    cases: list = field(default_factory=list)

    @classmethod
    def empty(cls, num_fg: int) -> "Counts":
        z = np.zeros((0, num_fg), np.int64)
        return cls(z, z.copy(), z.copy(), [])

    def add(self, tp, fp, fn, cases) -> None:
        self.tp = np.concatenate([self.tp, np.asarray(tp, np.int64)])
        self.fp = np.concatenate([self.fp, np.asarray(fp, np.int64)])
        self.fn = np.concatenate([self.fn, np.asarray(fn, np.int64)])
        self.cases.extend(cases)

    @property
    def n(self) -> int:
        return self.tp.shape[0]

    def head(self, n: int) -> "Counts":
        """The first ``n`` samples."""
        return Counts(self.tp[:n], self.fp[:n], self.fn[:n], list(self.cases[:n]))

    def per_case(self) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
        """Counts summed per case (order of first appearance): (case ids, tp, fp, fn)."""
        ids = list(dict.fromkeys(self.cases))
        index = {c: i for i, c in enumerate(ids)}
        rows = np.array([index[c] for c in self.cases], np.int64)
        out = []
        for a in (self.tp, self.fp, self.fn):
            s = np.zeros((len(ids), a.shape[1]), np.int64)
            np.add.at(s, rows, a)
            out.append(s)
        return ids, *out


def sample_dice(c: Counts, convention: str = DEFAULT_ADI) -> np.ndarray:
    """Per-sample Dice over foreground classes (N,). "project": the empty-foreground rule (undefined
    classes left out, 1 if all undefined). "paper": the authors' mean over classes of
    2TP/(2TP+FP+FN+1e-8) (absent class 0), NaN for samples without foreground in the ground truth
    (skipped by their ADI)."""
    if check_convention(convention) == "project":
        return _over_classes(_dice(c.tp, c.fp, c.fn))
    d = paper_class_dice(c.tp, c.fp, c.fn).mean(1) if c.tp.shape[1] else np.ones(c.n)
    return np.where(scored_samples(c, "paper"), d, np.nan)


def adi(c: Counts, convention: str = DEFAULT_ADI) -> dict:
    """Average Dice Index per class (index k -> label k+1) and over classes (key ``MEAN``).

    "project": per class, an undefined sample counts 1; over classes, :func:`sample_dice`.
    "paper" (the authors' ``getOnlineDiceMean``): only samples with foreground in the ground truth;
    per class 2TP/(2TP+FP+FN+1e-8) (absent from truth and prediction: 0); over classes the mean of
    those; NaN when no sample has foreground."""
    if check_convention(convention) == "project":
        d = _dice(c.tp, c.fp, c.fn)
        out = {k + 1: float(_undefined_is_one(d[:, k]).mean()) if c.n else float("nan") for k in range(d.shape[1])}
        out[MEAN] = float(_over_classes(d).mean()) if c.n else float("nan")
        return out
    keep = scored_samples(c, "paper")
    d = paper_class_dice(c.tp[keep], c.fp[keep], c.fn[keep])
    nan = float("nan")
    out = {k + 1: float(d[:, k].mean()) if keep.any() else nan for k in range(d.shape[1])}
    out[MEAN] = float(d.mean(1).mean()) if keep.any() else nan
    return out


def tvdi(c: Counts) -> dict:
    """Total Voxel Dice Index per class (pooled counts) and the mean over classes."""
    d = _dice(c.tp.sum(0), c.fp.sum(0), c.fn.sum(0))
    out = {k + 1: float(_undefined_is_one(d[k:k + 1])[0]) for k in range(d.shape[0])}
    out[MEAN] = float(_over_classes(d))
    return out


def dice3d(c: Counts) -> tuple[dict, dict]:
    """Per-case 3D Dice averaged over cases, per class and over classes; also each case's figure."""
    ids, tp, fp, fn = c.per_case()
    d = _dice(tp, fp, fn)
    per_case = {cid: float(v) for cid, v in zip(ids, _over_classes(d))}
    out = {k + 1: float(_undefined_is_one(d[:, k]).mean()) if ids else float("nan") for k in range(d.shape[1])}
    out[MEAN] = float(np.mean(list(per_case.values()))) if ids else float("nan")
    return out, per_case


def summarize(c: Counts, convention: str = DEFAULT_ADI) -> dict:
    """All figures: {"adi": {cls: v}, "tvdi": {...}, "dice3d": {...}, "dice3d_per_case": {case: v},
    "n_samples": N, "n_empty": {cls: samples with that class absent from the ground truth},
    "adi_convention": convention}. Only the ADI depends on the convention."""
    d3, per_case = dice3d(c)
    gt_empty = (c.tp + c.fn) == 0
    n_empty = {k + 1: int(gt_empty[:, k].sum()) for k in range(c.tp.shape[1])}
    n_empty[MEAN] = int(gt_empty.all(1).sum())
    return {"adi": adi(c, convention), "tvdi": tvdi(c), "dice3d": d3, "dice3d_per_case": per_case,
            "n_samples": c.n, "n_empty": n_empty, "adi_convention": convention}


def sample_dice_of(c: Counts, convention: str = DEFAULT_ADI) -> np.ndarray:
    """The per-sample Dice that ranks points (N,): the convention's (:func:`sample_dice`); for samples the
    paper's ADI skips (no foreground in the ground truth), the project's. The attacks that keep their
    best iterate and ``worst`` minimise this."""
    s = sample_dice(c, convention)
    return np.where(np.isnan(s), sample_dice(c, "project"), s)


def worst_counts(clean: Counts, attacks: list[Counts], convention: str = DEFAULT_ADI) -> tuple[Counts, np.ndarray]:
    """AutoAttack's reporting for Dice: per sample, the counts of the lowest per-sample Dice over the
    clean prediction AND every attack (a sample is counted robust only when it is right clean and
    under every attack, so no sample is reported above its clean score).

    ``clean``, ``attacks``: counts of the same samples (same order). Returns (counts, (N,) index of the
    chosen run: 0 = clean, i = ``attacks[i - 1]``; the first on ties). The Dice that decides is
    :func:`sample_dice_of` (the convention's). Every figure of the result (ADI, TVDI, 3D Dice) is
    computed from these counts."""
    if not attacks:
        raise ValueError("worst: no attack results to take the minimum over")
    runs = [clean, *attacks]
    n = clean.n
    if any(r.n != n or r.cases != clean.cases for r in runs):
        raise ValueError("worst: the clean and attack results are not over the same samples")
    scores = np.stack([sample_dice_of(r, convention) for r in runs])
    choice = np.argmin(scores, 0) if n else np.zeros(0, np.int64)
    pick = (lambda name: np.stack([getattr(r, name) for r in runs])[choice, np.arange(n)])
    return Counts(pick("tp"), pick("fp"), pick("fn"), list(clean.cases)), choice
