"""The attacks of ``nnunet-ima-attack --attacks``: one registry, each entry with its own step setting
and docstring. A new attack is one entry here; if it needs an iteration count of its own, that count is a
field of :class:`~nnunet_ima_eval.runner.AttackSettings` (its default) and a row of
``nnunet_ima.ui.VOCABULARY`` (its flag): the command line offers one ``--<setting>`` per step setting
named here (:func:`step_settings`).

Every entry runs ``run(model, x, y, eps, *, norm, steps, loss=None, generator=None, region=None,
best=False, score=None) -> x_adv`` on the kernel: x (B, C, *S) 2d or 3d, y labels (B, *S) / (B, 1, *S)
(pixels labelled :data:`nnunet_ima.losses.NOT_SCORED` count in no objective and no score), eps a float
or (B,) tensor, ``norm`` "l2"/"linf". ``loss`` (a per-sample callable, e.g. the model's own Dice+CE) is
used by "pgd", "ifgsm" and "apgd"; None means per-pixel CE; the others have a fixed objective
(:mod:`nnunet_ima.seg_losses`). ``region`` (broadcastable to x): where the perturbation may go (0 on
padding). ``best``: the PGD-type attacks return per sample their lowest-``score`` iterate instead of the
final point (``score`` default: the per-sample Dice); the APGD attacks always do (SEA).

>>> x_adv = ATTACKS["segpgd"].run(model, x, y, 2.0, norm="l2", steps=100)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nnunet_ima.apgd import apgd
from nnunet_ima.attacks import perturb_iterative
from nnunet_ima.seg_losses import cospgd_loss, segpgd_loss


@dataclass(frozen=True)
class Attack:
    """One entry: what runs, which ``AttackSettings`` field holds its iteration count (``--<field>``
    with dashes on the command line), whether it always returns its lowest-Dice iterate, and what it is."""

    run: Callable[..., torch.Tensor]
    steps: str
    doc: str
    keeps_best: bool = False


def _pgd_on(objective, random_start: bool = True):
    """PGD (``random_start``) or IFGSM on a fixed objective (None: the caller's ``loss``, else CE)."""
    def run(model, x, y, eps, *, norm, steps, loss=None, generator=None, region=None, best=False, score=None):
        return perturb_iterative(model, x, y, eps, norm=norm, steps=steps, random_start=random_start,
                                 loss=objective or loss or "ce", generator=generator if random_start else None,
                                 region=region, best=best, score=score)

    return run


def _apgd_on(objective: str | None, track: str | None = None):
    """APGD on a fixed objective (None: the caller's ``loss``, else CE), its step size following ``track``
    (None: the objective itself). APGD returns its lowest-score iterate whatever ``best`` says."""
    def run(model, x, y, eps, *, norm, steps, loss=None, generator=None, region=None, best=True, score=None):
        return apgd(model, x, y, eps, norm=norm, steps=steps, loss=objective or loss or "ce", track_loss=track,
                    score=score, generator=generator, region=region)

    run.__name__ = f"apgd_{objective or 'loss'}"
    return run


_SEA = "SEA (Croce, Singh & Hein 2024), run as SEA runs it: step size on the average CE, lowest-Dice " \
       "iterate returned, Linf radius 2, 1.5, 1 eps"

ATTACKS: dict[str, Attack] = {
    "pgd": Attack(_pgd_on(None), "pgd_steps", "PGD, random start, alpha = 4 eps / K (the IMA papers' protocol)"),
    "ifgsm": Attack(_pgd_on(None, random_start=False), "ifgsm_steps", "PGD from x, alpha = 4 eps / K (the papers')"),
    "segpgd": Attack(_pgd_on(segpgd_loss), "segpgd_steps",
                     "PGD with SegPGD's pixel weighting (Gu et al. 2022), same start and step as pgd"),
    "cospgd": Attack(_pgd_on(cospgd_loss), "cospgd_steps",
                     "PGD with CosPGD's cosine weighting (Agnihotri et al. 2024), same start and step as pgd"),
    "apgd": Attack(_apgd_on(None), "apgd_steps",
                   "APGD (Croce & Hein 2020) on the attack loss (--loss); its step size follows that loss", True),
    "apgd-mce": Attack(_apgd_on("masked_ce", track="ce"), "apgd_steps", f"APGD on masked CE, {_SEA}", True),
    "apgd-bmce": Attack(_apgd_on("balanced_masked_ce", track="ce"), "apgd_steps",
                        f"APGD on balanced masked CE, {_SEA}", True),
    "apgd-js": Attack(_apgd_on("js", track="ce"), "apgd_steps", f"APGD on the JS divergence, {_SEA}", True),
}


def step_settings() -> dict[str, list[str]]:
    """{AttackSettings field with an iteration count: the attacks that read it}, in registry order:
    ``{"pgd_steps": ["pgd"], ..., "apgd_steps": ["apgd", "apgd-mce", ...]}``."""
    out: dict[str, list[str]] = {}
    for name, attack in ATTACKS.items():
        out.setdefault(attack.steps, []).append(name)
    return out
