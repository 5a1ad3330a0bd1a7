"""Segmentation attack objectives: small named per-sample losses ``loss(output, y) -> (B,)``.

Every objective is a per-pixel (per-voxel) weighting of a per-pixel loss, averaged over the N
counted pixels of each sample, so that one attack loop (PGD, APGD) serves all of them, in 2d (B, C, H, W)
and 3d (B, C, D, H, W). ``output`` is the logits or nnU-Net's deep-supervision list (its first,
full-resolution element is used); ``y`` an integer label map (B, *S) or (B, 1, *S). Norm and budget
(L2/Linf, per-sample eps) are the attack's business, not the loss's.

Pixels labelled :data:`nnunet_ima.losses.NOT_SCORED` (padding, nnU-Net's ignore label; written by
:func:`nnunet_ima.losses.scored_labels`) are left out of every objective, its class weights and its
mean (:func:`nnunet_ima.losses.valid_pixels`, the project's one rule): their logits change neither
the value nor the gradient. SEA's code does the same with its ``ignore_index = -1`` mask, but divides
by all N pixels; the mean over the counted pixels differs from it by a constant factor per sample,
which neither the normalised steps nor APGD's per-sample comparisons see.

Notation per sample: z_i logits of pixel i, p_i = softmax(z_i), y_i its label, CE_i = -log p_{i,y_i},
correct_i = [argmax_c z_{i,c} = y_i]. Weights built from argmax or from p are constants for the
gradient (detached), as in the authors' code.

=====================  ==========================================================================
"ce"                   (1/N) sum_i CE_i
"masked_ce"            (1/N) sum_i correct_i CE_i                      (SEA: Croce, Singh & Hein 2024)
"balanced_masked_ce"   (1/N) sum_i w_{y_i} correct_i CE_i              (SEA, class-balanced)
"js"                   (1/N) sum_i JS(p_i || onehot(y_i))              (SEA)
"segpgd"               (1/N) sum_i [(1-l) correct_i + l (1-correct_i)] CE_i, l = (t-1)/(2T)  (Gu et al. 2022)
"cospgd"               (1/N) sum_i cos(softmax(z_i), onehot(y_i)) CE_i  (Agnihotri et al. 2024)
=====================  ==========================================================================
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .losses import LossFn, cross_entropy, first, masked_mean, target_and_keep, uses_progress


def pixel_mean(loss_map: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """(B, *S) per-pixel values -> (B,) mean over each sample's counted pixels ``keep`` (all when None;
    a (B,) input is returned as is). See :func:`nnunet_ima.losses.masked_mean`."""
    return masked_mean(loss_map, keep)


def _logits_target(output, y):
    """(logits, class map safe to index (0 where not counted), bool map of the counted pixels)."""
    logits = first(output)
    t, keep = target_and_keep(y, logits)
    return logits, t, keep


def _correct(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B, *S) float mask of pixels whose prediction equals the label (no gradient)."""
    return (logits.detach().argmax(1) == t).to(logits.dtype)


def masked_cross_entropy(output, y) -> torch.Tensor:
    """Masked CE (SEA, Croce, Singh & Hein ECCV 2024): only the still-correct pixels count,
    L = (1/N) sum_i correct_i * CE_i (the mask is recomputed at every iterate). Returns (B,)."""
    logits, t, keep = _logits_target(output, y)
    return pixel_mean(_correct(logits, t) * F.cross_entropy(logits, t, reduction="none"), keep)


def class_balance_weights(t: torch.Tensor, n_classes: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample inverse class frequencies (B, C): w_c = (1 / n_c) / sum_{c' present} (1 / n_c'),
    n_c the number of counted pixels (``keep``, all when None) labelled c in the sample (w_c = 0 for
    absent classes); rows sum to 1 (all 0 for a sample without a counted pixel)."""
    counts = torch.zeros(t.shape[0], n_classes, device=t.device)
    ones = torch.ones(t.flatten(1).shape, device=t.device) if keep is None else keep.flatten(1).float()
    counts.scatter_add_(1, t.flatten(1), ones)
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    return inv / inv.sum(1, keepdim=True).clamp(min=1e-12)


def balanced_masked_cross_entropy(output, y, *, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Class-balanced masked CE (SEA): L = (1/N) sum_i w_{y_i} * correct_i * CE_i. Returns (B,).

    ``class_weights`` (C,): fixed class weights, as the SEA code's precomputed dataset-level inverse
    class frequencies (e.g. their VOC table). Default None: each sample's own inverse class
    frequencies (:func:`class_balance_weights`), since an attack on one batch knows no dataset table."""
    logits, t, keep = _logits_target(output, y)
    if class_weights is None:
        w = class_balance_weights(t, logits.shape[1], keep).to(logits.dtype)  # (B, C)
        w_pix = w.gather(1, t.flatten(1)).view(t.shape)
    else:
        w_pix = class_weights.to(logits.device, logits.dtype)[t]
    return pixel_mean(w_pix * _correct(logits, t) * F.cross_entropy(logits, t, reduction="none"), keep)


def js_divergence(output, y) -> torch.Tensor:
    """Jensen-Shannon divergence to the one-hot label (SEA), L = (1/N) sum_i JS(p_i || e_{y_i}).

    With m = (p + e_y) / 2 it has the closed form (natural log, so 0 <= JS <= ln 2)
    JS = 1/2 [ (1 - p_y) ln 2 + p_y ln(2 p_y / (1 + p_y)) + ln(2 / (1 + p_y)) ],
    computed from log p_y (stable where p_y underflows). Returns (B,)."""
    logits, t, keep = _logits_target(output, y)
    logp_y = F.log_softmax(logits, 1).gather(1, t.unsqueeze(1)).squeeze(1)
    p_y = logp_y.exp()
    ln2 = math.log(2.0)
    log1p_y = torch.log1p(p_y)
    js = 0.5 * ((1 - p_y) * ln2 + p_y * (ln2 + logp_y - log1p_y) + (ln2 - log1p_y))
    return pixel_mean(js, keep)


def segpgd_weights(logits: torch.Tensor, t: torch.Tensor, progress: float) -> torch.Tensor:
    """SegPGD's pixel weights (B, *S): 1 - lambda on correct pixels, lambda on wrong ones, with
    lambda = progress / 2; progress = (t - 1) / T at iteration t = 1..T gives the paper's (t - 1) / (2T)."""
    lam = float(progress) / 2.0
    c = _correct(logits, t)
    return (1 - lam) * c + lam * (1 - c)


@uses_progress
def segpgd_loss(output, y, *, progress: float = 0.0) -> torch.Tensor:
    """SegPGD (Gu et al., ECCV 2022, eq. 4): L = (1/N) sum_i [(1 - l) correct_i + l wrong_i] CE_i with
    l = (t - 1) / (2T): early iterations push the correct pixels, later ones all pixels. The attack loop
    passes ``progress`` = (t - 1) / T (see :func:`nnunet_ima.losses.uses_progress`). Returns (B,)."""
    logits, t, keep = _logits_target(output, y)
    return pixel_mean(segpgd_weights(logits, t, progress) * F.cross_entropy(logits, t, reduction="none"), keep)


def cospgd_weights(logits: torch.Tensor, t: torch.Tensor, activation: str = "softmax") -> torch.Tensor:
    """CosPGD's pixel weights (B, *S), detached: cos(a(z_i), e_{y_i}) = a(z_i)_{y_i} / ||a(z_i)||_2,
    a = softmax over classes (the authors' package, ``cospgd_scale``) or "sigmoid" per class."""
    z = logits.detach()
    if activation == "softmax":
        a = F.softmax(z, 1)
    elif activation == "sigmoid":
        a = torch.sigmoid(z)
    else:
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    return a.gather(1, t.unsqueeze(1)).squeeze(1) / a.norm(dim=1).clamp(min=1e-12)


def cospgd_loss(output, y, *, activation: str = "softmax") -> torch.Tensor:
    """CosPGD (Agnihotri et al., ICML 2024): L = (1/N) sum_i cos(a(z_i), onehot(y_i)) * CE_i, the
    cosine weight detached: pixels the model still predicts confidently right weigh most, pixels
    already fooled fade out smoothly. The paper's Algorithm 1 writes cossim(Psi*(P), Psi'(Y)) with
    Psi' the one-hot encoding and Psi* a normalisation of the predictions left to the task; the
    authors' ``cospgd`` package (``cospgd_scale``, one_hot=True) uses softmax over the classes, our
    default ``activation="softmax"`` (tested equal). ``activation="sigmoid"``: per-class sigmoid of the
    logits instead (a sigmoid reading of Psi*). Returns (B,)."""
    logits, t, keep = _logits_target(output, y)
    return pixel_mean(cospgd_weights(logits, t, activation) * F.cross_entropy(logits, t, reduction="none"), keep)


SEG_LOSSES: dict[str, LossFn] = {
    "ce": cross_entropy,
    "masked_ce": masked_cross_entropy,
    "balanced_masked_ce": balanced_masked_cross_entropy,
    "js": js_divergence,
    "segpgd": segpgd_loss,
    "cospgd": cospgd_loss,
}
